r"""Score classifiers on (original, transmitted) pairs: PI, IOL / OLS, accuracy, with reports.

    python -m covidmt_jax.score --config configs/score_demo.py:model=runs/demo/export/best \
        --workdir runs/score_demo

One module per job:

- :mod:`~covidmt_jax.scoring.config`: the config schema (``base_config``, ``classifier_entry``,
  ``synthetic_config``, ``validate``).
- :mod:`~covidmt_jax.scoring.loading`: classifiers by kind (a registry: ``kind -> loader``) and
  the lung segmenter(s) (``{convention: LungSegmenter}`` from ONE resolver, ``lung_dirs``).
- :mod:`~covidmt_jax.scoring.step`: the ONE jitted step per batch for all classifiers and
  :class:`~covidmt_jax.scoring.step.Scorer` (Grad-CAM through :func:`covidmt_jax.explain.gradcam`).
- :mod:`~covidmt_jax.scoring.pairs`: the pair source, decoding on a thread pool, input signatures.
- :mod:`~covidmt_jax.scoring.rows`: row columns and the crash-safe row store.
- :mod:`~covidmt_jax.scoring.job`: the resumable job loop (content-checked resume, multi-process
  slicing), summary, galleries, the JPEG-quality sweep.
- Summaries, plots and ``report.md``: :mod:`covidmt_jax.report`.

The job, in order: pairs from ``config.pairs`` are decoded, resized to ``image_size`` and
normalised ahead of the device; originals and transmitted images are concatenated to
``[2B, S, S, 1]`` (B padded to a multiple of the device count, sharded over the mesh's ``data``
axis); the lung U-Net runs once per image; per classifier: COVID probability, Grad-CAM of the
predicted decision, IOL against the lung mask; the lung-mask QC pixel counts
(:mod:`covidmt_jax.lung_qc`). Only per-image scalars and the default convention's boolean lung
mask (its connected components are counted on the host) leave the device. Rows (one
per pair and classifier) are appended to ``WORKDIR/rows.csv`` (or ``rows.parquet/``) after every
batch; then ``summary.json``, ``report.md``, plots and galleries.

Errors become rows, never crashes: an unreadable side, original and transmitted images whose
aspect ratios differ by more than ``pairs.max_aspect_diff``, an empty lung mask on either side,
or a non-finite output set the ``error`` column; every score in the summary is computed on the
rows without an error, and errors are counted by kind. Re-running with the same ``--workdir``
resumes; see :mod:`covidmt_jax.scoring.job` for what is re-scored and what is refused.
"""
from covidmt_jax.scoring.config import base_config, classifier_entry, synthetic_config, validate
from covidmt_jax.scoring.job import fingerprint, run, score_pairs
from covidmt_jax.scoring.loading import (Head, classifier_kinds, load_classifier, load_lungs, load_models,
                                         lung_dirs, register_classifier_kind)
from covidmt_jax.scoring.rows import ROW_COLUMNS, RowStore, row_columns
from covidmt_jax.scoring.step import Scorer

__all__ = ["base_config", "classifier_entry", "synthetic_config", "validate", "run", "score_pairs",
           "fingerprint", "Head", "classifier_kinds", "load_classifier", "load_lungs", "load_models",
           "lung_dirs", "register_classifier_kind", "ROW_COLUMNS", "RowStore", "row_columns", "Scorer"]
