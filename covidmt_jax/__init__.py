"""covidmt_jax: chest-X-ray classifiers that stay right after messaging-app compression.

Sub-packages: ``models`` (zoo, COVIDMT, U-Net), ``weights`` (torchvision/timm import),
``data`` (sources, pipelines, phantoms), ``channels`` (messaging-channel simulator),
``explain`` (Grad-CAM), ``metrics`` (PI, IOL, OLS, ...), ``train`` and ``score`` (CLIs).
"""
__version__ = "0.1.0"
