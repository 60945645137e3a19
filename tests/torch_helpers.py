"""Helpers shared by the tests that compare against PyTorch models (import torch lazily)."""
from __future__ import annotations


def randomise_batchnorm(module, *, seed: int = 1, affine: bool = True):
    """Give every ``BatchNorm2d`` of ``module`` random running statistics (and, with ``affine``,
    random scale and shift), so parity tests exercise BatchNorm in inference mode rather than an
    identity. Returns ``module.eval()``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.copy_(torch.rand(mod.num_features, generator=gen) - 0.5)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
                if affine:
                    mod.weight.copy_(torch.rand(mod.num_features, generator=gen) + 0.5)
                    mod.bias.copy_(torch.rand(mod.num_features, generator=gen) - 0.5)
    return module.eval()
