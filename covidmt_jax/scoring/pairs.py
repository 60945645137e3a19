"""Pairs of a scoring job: the source, decoding on a thread pool, and input signatures.

Each side is decoded, resized to ``image_size`` x ``image_size`` (aspect NOT kept, as in
training) and normalised by :func:`covidmt_jax.data.pipeline.load_pair`; a thread pool decodes
ahead of the device (Pillow and the JPEG codec release the GIL). Data problems become
:attr:`Loaded.error`, never exceptions.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Mapping, Sequence

import ml_collections
import numpy as np

from covidmt_jax import channels
from covidmt_jax.config_lib import ConfigError
from covidmt_jax.data.pipeline import load_pair
from covidmt_jax.data.records import DataError
from covidmt_jax.data.sources import get_source
from covidmt_jax.scoring.rows import ERR_SIZE, ERR_UNREADABLE

_INPUT_KEYS = ("original", "transmitted", "image")


def _kwargs(pairs_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    kw = pairs_cfg.kwargs
    return kw.to_dict() if hasattr(kw, "to_dict") else dict(kw)


def build_source(pairs_cfg: ml_collections.ConfigDict, quality: int = 0):
    """The pair source of ``config.pairs`` (``quality`` overrides the channel's JPEG quality)."""
    kwargs = _kwargs(pairs_cfg)
    q = int(quality or pairs_cfg.quality or 0)
    if pairs_cfg.source == "synthetic_pairs" and q:
        kwargs["quality"] = q
    return get_source(pairs_cfg.source, **kwargs)


def source_channel(pairs_cfg: ml_collections.ConfigDict, quality: int = 0):
    """The channel applied on the fly (``folder`` sources), else None."""
    if pairs_cfg.source != "folder":
        return None
    q = int(quality or pairs_cfg.quality or 0)
    return channels.get_channel(pairs_cfg.channel, **({"quality": q} if q else {}))


#: ``label_column`` of a source whose every class is a negative one (e.g. a folder holding only
#: ``0_NON_COVID/``): every labelled film is COVID-negative (label 0).
ALL_NEGATIVE = -1

_NEGATIVE_WORDS = ("non_covid", "non-covid", "noncovid", "not_covid", "no_covid", "negative",
                   "normal", "healthy")


def _is_positive_name(name: str) -> bool:
    """A class name that says COVID-positive by the conventions of the sources (WaCXR's
    ``1_COVID-19``, COVIDx's ``COVID-19`` / ``positive``, a study's ``covid``)."""
    low = name.lower()
    if _is_negative_name(name):
        return False
    return low in ("positive", "covid-19", "covid", "covid19", "1_positive") or (
        "covid" in low and not low.startswith("0_"))


def _is_negative_name(name: str) -> bool:
    """A class name that says negative (``0_...`` prefix, NON_COVID, negative, normal)."""
    low = name.lower()
    return low.startswith("0_") or any(w in low for w in _NEGATIVE_WORDS)


def label_column(source, label: str) -> int | None:
    """Column of ``record["labels"]`` holding the COVID ground truth; None = unlabelled;
    :data:`ALL_NEGATIVE` = every class of the source is a negative one.

    Without ``label`` the positive class is decided by name (:func:`_is_positive_name`),
    never by position: a lone class is positive only when its name says COVID, and a source
    whose classes are all negative (``0_NON_COVID`` ...) labels every film 0. A labelled source
    whose positive class cannot be told raises :class:`ConfigError` naming the classes and
    ``pairs.label``."""
    names = tuple(getattr(source, "label_names", ()) or ())
    if label:
        if label not in names:
            raise ConfigError(f"config.pairs.label {label!r} is not a label of {source.name}; "
                              f"valid: {list(names)}")
        return names.index(label)
    if not names:
        return None
    positive = [i for i, n in enumerate(names) if _is_positive_name(n)]
    if len(positive) == 1:
        return positive[0]
    if not positive and all(_is_negative_name(n) for n in names):
        return ALL_NEGATIVE
    why = (f"several classes look COVID-positive ({[names[i] for i in positive]})" if positive
           else "no class name says COVID-positive (COVID / positive, e.g. 1_COVID-19)")
    raise ConfigError(f"config.pairs.label: cannot tell the positive class of {source.name} with "
                      f"classes {list(names)}: {why}; choose it with --config.pairs.label=NAME "
                      f"(label=NAME in configs/score_channel.py)")


def input_signature(record: Mapping[str, Any]) -> str:
    """A short signature of a pair record's inputs: it changes when an input file changes.

    A file given by path contributes its size and modification time (``st_mtime_ns``), not a
    hash of its contents: ``os.stat`` reads no image data, so checking the 13,000 files of a
    WaCXR-sized job on every resume is instant where hashing would read them all again; and
    every way of changing a file (re-saving, copying over it, re-downloading) changes its
    mtime, the same rule ``make`` and ``rsync`` rely on. The one miss is a different content
    written with its old size AND mtime restored on purpose (``touch -d``, ``cp -p`` of a
    same-size file). Inputs held in memory (bytes, e.g. synthetic phantoms) are hashed
    (SHA-1), since they have no file. The labels are part of the signature. A file that
    cannot be stat'ed contributes ``"missing"``.
    """
    h = hashlib.sha1()
    for key in _INPUT_KEYS:
        if key not in record:
            continue
        v = record[key]
        if isinstance(v, (bytes, bytearray, memoryview)):
            part = "sha1:" + hashlib.sha1(bytes(v)).hexdigest()
        elif isinstance(v, (str, os.PathLike)):
            try:
                st = os.stat(v)
                part = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError:
                part = "missing"
        else:
            part = "array:" + hashlib.sha1(np.ascontiguousarray(v).tobytes()).hexdigest()
        h.update(f"{key}={part};".encode())
    labels = record.get("labels")
    if labels is not None:
        h.update(b"labels=" + np.asarray(labels, np.float32).tobytes())
    return h.hexdigest()[:16]


@dataclasses.dataclass
class Loaded:
    """One pair after decoding: normalised ``[S, S, 1]`` arrays, or ``error``."""
    index: int
    pair_id: str
    label: int
    original: np.ndarray | None = None
    transmitted: np.ndarray | None = None
    orig_hw: tuple[int, int] = (0, 0)
    trans_hw: tuple[int, int] = (0, 0)
    error: str = ""
    signature: str = ""


def load_one(source, index: int, pair_id: str, image_size: int, channel, label_col: int | None,
             max_aspect_diff: float) -> Loaded:
    """Decode pair ``index`` of ``source``; problems become ``Loaded.error`` (never raise for
    data problems). The input signature is taken BEFORE decoding, so a file changed while it is
    read gets re-scored on the next run."""
    out = Loaded(index, pair_id, -1)
    try:
        rec = source[index]
        out.signature = input_signature(rec)
        if "original" not in rec and "image" in rec:
            rec = {**rec, "original": rec["image"]}
        labels = rec.get("labels")
        if label_col == ALL_NEGATIVE and labels is not None:
            out.label = 0
        elif label_col is not None and labels is not None and len(labels) > label_col:
            out.label = int(round(float(labels[label_col])))
        s = load_pair(rec, image_size, channel=channel)
    except (DataError, OSError, ValueError) as e:
        out.error = f"{ERR_UNREADABLE}: {e}"
        return out
    out.orig_hw, out.trans_hw = tuple(s.original_hw), tuple(s.transmitted_hw)
    if max_aspect_diff > 0:
        ar_o = out.orig_hw[1] / out.orig_hw[0]
        ar_t = out.trans_hw[1] / out.trans_hw[0]
        diff = abs(ar_o - ar_t) / ar_o
        if diff > max_aspect_diff:
            out.error = (f"{ERR_SIZE}: original {out.orig_hw[0]}x{out.orig_hw[1]} vs transmitted "
                         f"{out.trans_hw[0]}x{out.trans_hw[1]} (aspect ratios differ by "
                         f"{100 * diff:.1f} %)")
            return out
    out.original, out.transmitted = s.original, s.transmitted
    return out


def _signature_or_error(source, index: int) -> str:
    try:
        return input_signature(source[index])
    except (DataError, OSError, ValueError):
        return ""


def current_signatures(source, indices: Sequence[int], num_workers: int) -> dict[int, str]:
    """``{index: input_signature}`` of ``source``'s pairs now (stat calls for file sources;
    records computed on access, e.g. phantoms, are generated again). ``""`` where the record
    itself cannot be read."""
    with ThreadPoolExecutor(max(1, int(num_workers))) as pool:
        sigs = list(pool.map(lambda i: _signature_or_error(source, i), indices))
    return dict(zip(indices, sigs))


def prefetch_batches(load: Callable[[int, str], Loaded], items: Sequence[tuple[int, str]],
                     batch_sizes: int | Sequence[int], num_workers: int,
                     prefetch: int = 2) -> Iterator[list[Loaded]]:
    """Batches of :class:`Loaded` in order, decoded by a thread pool ``prefetch`` batches ahead.
    Memory: ``(prefetch + 1)`` batches of pairs.

    ``batch_sizes``: one size for all batches, or the size of each batch in turn (a batch of
    size 0 is yielded as an empty list)."""
    if isinstance(batch_sizes, int):
        batch_sizes = [min(batch_sizes, len(items) - i) for i in range(0, len(items), batch_sizes)]
    bounds = np.cumsum([0, *batch_sizes])
    if bounds[-1] != len(items):
        raise ValueError(f"batch sizes sum to {bounds[-1]}, not the {len(items)} items")
    chunks = [items[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    with ThreadPoolExecutor(max(1, int(num_workers))) as pool:
        pending = []
        for chunk in chunks[:prefetch + 1]:
            pending.append([pool.submit(load, i, pid) for i, pid in chunk])
        nxt = prefetch + 1
        while pending:
            futures = pending.pop(0)
            if nxt < len(chunks):
                pending.append([pool.submit(load, i, pid) for i, pid in chunks[nxt]])
                nxt += 1
            yield [f.result() for f in futures]
