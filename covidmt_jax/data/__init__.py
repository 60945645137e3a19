"""Data layer: the robust decoder (``images``), the record schema and ``DataError``
(``records``), dataset sources (``sources``), phantoms (``synthetic``), augmentation and
grain pipelines. Importing this package is cheap: only ``records`` is loaded eagerly;
import the sub-modules you need (``from covidmt_jax.data import images``).
"""
from covidmt_jax.data.records import DataError, PairRecord, Record

__all__ = ["DataError", "Record", "PairRecord"]
