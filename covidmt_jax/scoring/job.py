"""The scoring job: start-up checks, the resumable loop over batches, summary, report, galleries.

Resume is decided by content, never by names alone:

- ``WORKDIR/job.json`` holds the job's fingerprint (:func:`fingerprint`): the digests of every
  loaded model (classifiers and lung segmenters, :func:`model_digest`) and the config fields that
  change a row's values (:func:`settings`). It is written only after a successful start (models
  loaded, pairs listed, step built), so a typo in ``model=`` or ``root=`` leaves nothing behind.
- A rerun whose fingerprint differs REFUSES (``ConfigError``) and names every difference (e.g.
  "classifier 'resnet18' parameters changed"): re-scoring silently would replace published
  figures, and mixing would report rows of two models as one. Score into a new ``--workdir``,
  or delete the old rows and ``job.json`` to start over in place.
- Rows without ``job.json`` (it was deleted) are REFUSED: which job wrote them cannot be
  checked, so they are never adopted as the new job's rows. ``config.json`` is written only
  once the job is accepted, so a refused rerun leaves the old job's ``config.json``. A workdir
  holding another kind of run (a training run's ``checkpoints/`` or ``export/``) is refused.
- A source that lists no pair is an error naming its root and the files it skipped or ignored
  (``pairs.limit=0`` runs on purpose with no pairs).
- Rows written by an earlier version of the row format (before the lung-mask QC columns,
  fingerprint version 2) are refused the same way: the fingerprint version differs.
- Each row stores the signature of its pair's input files
  (:func:`covidmt_jax.scoring.pairs.input_signature`); a pair whose files changed since is
  re-scored, and so is every error row (a repaired image gets its score).
- Rows are keyed by ``pair_id``. Summary, report and galleries cover exactly the pairs selected
  now (``pairs.limit``; deleted pairs dropped, added pairs scored); ``index`` is each pair's
  current position in the source. At the end the row store is compacted: one row per
  (pair, model), rows of pairs no longer in the source removed.
- ``pairs.patients`` (:mod:`covidmt_jax.scoring.patients`) is read at the start: a pair
  without a patient stops the job before anything is scored. Patients change the statistics
  only, not a row, so they are not in the fingerprint: giving them to a finished job
  re-summarises it (``WORKDIR/patients.csv`` keeps the pair -> patient map next to the rows).
- A job killed at any point (``kill -9``) resumes without duplicates: rows are appended batch by
  batch, the latest row of a key wins, and the compaction is atomic.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from covidmt_jax import lung_qc, parallel, report
from covidmt_jax.cli import hms
from covidmt_jax.config_lib import ConfigError
from covidmt_jax.data.records import DataError
from covidmt_jax.lungs import LungSegmenter
from covidmt_jax.normalisation import denormalise
from covidmt_jax.scoring import pairs as pairs_lib
from covidmt_jax.scoring import patients as patients_lib
from covidmt_jax.scoring.config import qc_thresholds, validate, with_quality
from covidmt_jax.scoring.loading import DEFAULT_LUNGS, Head, check_classifiers, load_models
from covidmt_jax.scoring.rows import INPUT_SIG, RowStore, pair_rows, row_columns, select
from covidmt_jax.scoring.step import Scorer

log = logging.getLogger("covidmt_jax.scoring")

FINGERPRINT_VERSION = 3  # 3: rows carry the lung-mask QC flags
PATIENTS_FILE = "patients.csv"  # pair_id,patient of the job's pairs (config.pairs.patients)


# ============================================================================ fingerprint
def model_digest(model: nnx.Module, *extra: Any) -> str:
    """SHA-256 (16 hex digits) of a loaded model: its class, every state array's path, dtype,
    shape and bytes (the contents of ``params.safetensors`` as the model holds them; the
    architecture in ``model.json`` fixes those paths and shapes), and ``extra`` values."""
    h = hashlib.sha256(type(model).__name__.encode())
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model))
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape};".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    for e in extra:
        h.update(repr(e).encode())
    return h.hexdigest()[:16]


def settings(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config fields that change a row's values (paths of model files are not among them:
    the models' contents are fingerprinted instead), and the lung-mask QC thresholds."""
    p = cfg.pairs
    classifiers = {n: {k: v for k, v in e.to_dict().items() if k != "path"}
                   for n, e in cfg.classifiers.items()}
    return json.loads(json.dumps({
        "classifiers": classifiers, "source": p.source,
        "kwargs": p.kwargs.to_dict() if hasattr(p.kwargs, "to_dict") else dict(p.kwargs),
        "channel": p.channel, "quality": p.quality, "label": p.label,
        "max_aspect_diff": p.max_aspect_diff, "image_size": cfg.image_size, "dtype": cfg.dtype,
        "cam": cfg.cam.to_dict(), "threshold": cfg.threshold, "row_format": cfg.output.format,
        "lung_qc": dataclasses.asdict(qc_thresholds(cfg))},
        default=str))


def fingerprint(cfg: ml_collections.ConfigDict, classifiers: Mapping[str, tuple[nnx.Module, Head]],
                lungs: Mapping[str, LungSegmenter]) -> dict[str, Any]:
    """``{"version", "settings", "classifiers": {name: digest}, "lungs": {convention: digest}}``."""
    return {"version": FINGERPRINT_VERSION, "settings": settings(cfg),
            "classifiers": {n: model_digest(m) for n, (m, _) in classifiers.items()},
            "lungs": {c: model_digest(s.model, s.input_size) for c, s in lungs.items()}}


def fingerprint_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints (empty when equal)."""
    if old.get("version") != new.get("version"):
        return [f"fingerprint version {old.get('version')} -> {new.get('version')} (rows written "
                "by another version of covidmt_jax)"]
    out = []
    so, sn = old.get("settings", {}), new.get("settings", {})
    for k in sorted(set(so) | set(sn)):
        if so.get(k) != sn.get(k):
            out.append(f"config {k}: {json.dumps(so.get(k))} -> {json.dumps(sn.get(k))}")
    for what, label in (("classifiers", "classifier"), ("lungs", "lung segmenter")):
        o, n = old.get(what, {}), new.get(what, {})
        for k in sorted(set(o) | set(n)):
            if k not in n:
                out.append(f"{label} {k!r} removed")
            elif k not in o:
                out.append(f"{label} {k!r} added")
            elif o[k] != n[k]:
                out.append(f"{label} {k!r} parameters changed (digest {o[k]} -> {n[k]})")
    return out


def check_job(workdir: Path, fp: Mapping[str, Any], rows_path: Path) -> bool:
    """Raise ``ConfigError`` when ``workdir/job.json`` is another job's; returns whether it exists."""
    path = workdir / "job.json"
    if not path.is_file():
        orphans = [r for r in (workdir / "rows.csv", workdir / "rows.parquet") if r.exists()]
        if orphans:
            raise ConfigError(
                f"{orphans[0]}: rows of an unknown job ({path.name} is missing, so which models and "
                f"settings scored them cannot be checked); delete {orphans[0]} to re-score "
                f"everything here, or use a new --workdir")
        return False
    try:
        old = json.loads(path.read_text())["fingerprint"]
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{path}: unreadable ({e}); delete it and {rows_path.name} to start over") from None
    changes = fingerprint_changes(old, fp)
    if changes:
        raise ConfigError(
            f"{workdir} holds rows of a different job: {'; '.join(changes)}. Rows of different "
            f"models or settings are never mixed: score into a new --workdir, or delete "
            f"{path} and {rows_path} to re-score everything here")
    return True


#: Entries of a workdir written by another kind of run (``covidmt_jax.train``).
_FOREIGN_RUN_MARKERS = ("checkpoints", "export")


def _is_scoring_workdir(workdir: Path) -> bool:
    """A workdir of a scoring job: its ``job.json`` or rows, or those of a quality sweep."""
    if any((workdir / n).exists() for n in ("job.json", "rows.csv", "rows.parquet")):
        return True
    return any(q.is_dir() and (q / "job.json").is_file() for q in workdir.glob("q[0-9][0-9][0-9]"))


def check_workdir(workdir: Path) -> None:
    """Raise ``ConfigError`` when ``workdir`` holds another kind of run (a training run's
    ``checkpoints/`` or ``export/``) and no scoring job: scoring there would replace that
    run's ``summary.json`` and ``config.json``."""
    if not workdir.is_dir() or _is_scoring_workdir(workdir):
        return
    found = [n for n in _FOREIGN_RUN_MARKERS if (workdir / n).exists()]
    if found:
        raise ConfigError(
            f"--workdir {workdir} holds another kind of run ({', '.join(f + '/' for f in found)}: a "
            f"training run), not a scoring job; scoring there would replace its summary.json and "
            f"config.json: use a new --workdir (e.g. {workdir}/score)")


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON (NaN / Inf -> null, ``report.jsonable``), written atomically."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report.jsonable(obj), indent=2, allow_nan=False))
    os.replace(tmp, path)


# ============================================================================ the job
def _progress(total: int, enabled: bool):
    return tqdm(total=total, unit="pair", desc="scoring", file=sys.stderr, mininterval=1.0,
                smoothing=0.1, disable=not enabled or jax.process_index() != 0)


def _plan(store: RowStore, source, ids: Sequence[str], n: int, names: Sequence[str],
          num_workers: int) -> tuple[set, dict[str, int]]:
    """``(done, counts)``: the (pair_id, model) keys of the selected pairs whose stored row is
    current (no error, same input signature now), and why the others are scored."""
    rows = store.read()
    selected = {pid: i for i, pid in enumerate(ids[:n])}
    in_sel = np.asarray([pid in selected for pid in rows["pair_id"].tolist()], bool)
    in_sel &= np.isin(rows["model"], list(names))
    rows = select(rows, in_sel)
    ok = rows["error"] == ""
    wanted = sorted({selected[pid] for pid in rows["pair_id"][ok].tolist()})
    now = pairs_lib.current_signatures(source, wanted, num_workers) if wanted else {}
    done, counts = set(), {"errors_retried": 0, "inputs_changed": 0}
    for pid, m, err, sig in zip(rows["pair_id"].tolist(), rows["model"].tolist(),
                                rows["error"].tolist(), rows[INPUT_SIG].tolist()):
        if err:
            counts["errors_retried"] += 1
        elif not sig or now.get(selected[pid]) != sig:
            counts["inputs_changed"] += 1
        else:
            done.add((pid, m))
    return done, counts


def score_pairs(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, *, quality: int = 0,
                models: tuple[dict, Any] | None = None, mesh=None,
                on_accept: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run (or resume) one scoring job into ``workdir``; returns the summary (``{}`` on
    processes other than 0). ``models``: ``(classifiers, lungs)`` already loaded
    (:func:`covidmt_jax.scoring.loading.load_models`). ``on_accept``: called on process 0
    once the job is accepted (start-up checks passed, resume allowed), before anything is
    scored (:func:`run` writes ``config.json`` there)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    jcfg = with_quality(cfg, quality)
    # --- start: everything that can fail on a bad config happens before job.json is written
    classifiers, lungs = models if models is not None else load_models(cfg)
    if isinstance(lungs, LungSegmenter):
        lungs = {DEFAULT_LUNGS: lungs}
    names, conventions = list(classifiers), list(lungs)
    source = pairs_lib.build_source(cfg.pairs, quality)
    channel = pairs_lib.source_channel(cfg.pairs, quality)
    label_col = pairs_lib.label_column(source, cfg.pairs.label)
    p = jax.process_index()
    # Process 0 alone reads and writes the row store and job.json; the other processes get
    # its plan and send it their rows, so WORKDIR need not be on a shared file system.
    store = RowStore(workdir, cfg.output.format, row_columns(conventions)) if p == 0 else None
    fp = fingerprint(jcfg, classifiers, lungs)
    ids = list(source.ids)
    n = len(ids) if cfg.pairs.limit < 0 else min(int(cfg.pairs.limit), len(ids))
    ignored = list(getattr(source, "ignored", ()) or ())
    if ignored:
        log.warning("%s: %d file(s) ignored (not image files), e.g. %s", source.name, len(ignored),
                    "; ".join(f"{a} ({b})" for a, b in ignored[:3]))
    if n == 0 and cfg.pairs.limit != 0:
        raise no_pairs_error(source)
    check_same_pairs(source.name, ids[:n])
    patient_files = patients_lib.patient_files(cfg.pairs.get("patients", ""))
    patient_of: dict[str, str] = {}  # process 0: pair_id -> patient (pairs.patients)
    done: set = set()  # process 0: the (pair_id, model) rows that are current

    def plan() -> dict[str, Any]:
        if patient_files:  # read where it is used; an error stops every process
            patient_of.update(patients_lib.pair_patients(
                ids[:n], patients_lib.read_patient_map(patient_files), patient_files))
        existed = check_job(workdir, fp, store.path)
        current, counts = _plan(store, source, ids, n, names, cfg.num_workers)
        done.update(current)
        return {"existed": existed, "counts": counts,
                "todo": [i for i in range(n) if any((ids[i], m) not in done for m in names)]}

    planned = parallel.on_process0(plan, "scoring plan")
    counts = planned["counts"]
    todo = [(i, ids[i]) for i in planned["todo"]]
    scorer = Scorer(classifiers, lungs, cfg.image_size, cfg.batch_size, method=cfg.cam.method,
                    cam_threshold=cfg.cam.cam_threshold, mesh=mesh, qc_thresholds=qc_thresholds(cfg))
    if not planned["existed"] and p == 0:
        write_json(workdir / "job.json", {"fingerprint": fp})
    if on_accept is not None and p == 0:
        on_accept()
    log.info("%s: %d pairs selected, %d to score (%d error rows retried, %d rows with changed "
             "inputs), %d classifier(s) %s, %d device(s)", source.name, n, len(todo),
             counts["errors_retried"], counts["inputs_changed"], len(names), names,
             jax.device_count())

    # Each process loads its share of every global batch (one process: all of it).
    lb = scorer.local_batch
    global_b = lb * jax.process_count()
    starts = range(0, len(todo), global_b)
    sizes = [min(global_b, len(todo) - s0) for s0 in starts]
    mine_items = [it for s0 in starts for it in todo[s0:s0 + global_b][p * lb:(p + 1) * lb]]
    mine_counts = [len(todo[s0:s0 + global_b][p * lb:(p + 1) * lb]) for s0 in starts]

    def load(i: int, pid: str) -> pairs_lib.Loaded:
        return pairs_lib.load_one(source, i, pid, cfg.image_size, channel, label_col,
                                  cfg.pairs.max_aspect_diff)

    bar = _progress(len(todo), cfg.progress)
    start = time.time()
    n_done = 0
    s = scorer.image_size
    batches = pairs_lib.prefetch_batches(load, mine_items, mine_counts, cfg.num_workers)
    for bi, (mine, n_batch) in enumerate(zip(batches, sizes)):
        good = [it for it in mine if not it.error]
        xo = np.stack([it.original for it in good]) if good else np.zeros((0, s, s, 1), np.float32)
        xt = np.stack([it.transmitted for it in good]) if good else np.zeros((0, s, s, 1), np.float32)
        orig, trans = scorer(xo, xt)  # always called: every process runs every step
        rows, k = [], 0
        for it in mine:
            if it.error:
                rows.extend(pair_rows(it, names, scorer.heads, None, None, 0, conventions))
            else:
                rows.extend(pair_rows(it, names, scorer.heads, orig, trans, k, conventions))
                k += 1
        if jax.process_count() > 1:  # every process's rows, in the order of ``todo``
            rows = [r for part in parallel.allgather_json(rows, "scored rows") for r in part]
        if p == 0:
            store.append([r for r in rows if (r["pair_id"], r["model"]) not in done])
        n_done += n_batch
        bar.update(n_batch)
        if cfg.log_every and ((bi + 1) % cfg.log_every == 0 or n_done == len(todo)):
            rate = n_done / max(time.time() - start, 1e-9)
            log.info("scored %d/%d pairs  %.2f pairs/s  ETA %s", n_done, len(todo), rate,
                     hms((len(todo) - n_done) / max(rate, 1e-9)))
    bar.close()
    wall = time.time() - start
    finished: dict[str, Any] = {}  # process 0: the summary, rows and gallery choice

    def summarise() -> list[int]:
        # --- the rows of this job now: one per (pair, model), current positions, selected pairs
        position = {pid: i for i, pid in enumerate(ids)}
        rows = store.read()
        keep = np.asarray([pid in position for pid in rows["pair_id"].tolist()], bool)
        rows = select(rows, keep & np.isin(rows["model"], names))
        rows["index"] = np.asarray([position[pid] for pid in rows["pair_id"].tolist()], np.int64)
        store.compact(rows)
        rows = select(rows, rows["index"] < n)
        if patient_files:
            rows[report.PATIENT_COLUMN] = np.asarray([patient_of[pid] for pid in rows["pair_id"].tolist()],
                                                     dtype=object)
            write_patients(workdir / PATIENTS_FILE, patient_of)
        else:  # a map of an earlier run would contradict this summary
            (workdir / PATIENTS_FILE).unlink(missing_ok=True)
        summary = report.summarize(rows, names, eta=cfg.eta, conventions=conventions,
                                   thresholds={m: classifiers[m][1].threshold for m in names})
        summary["job"] = {
            "source": source.name, "n_pairs_selected": n, "scored_this_run": len(todo),
            "errors_retried": counts["errors_retried"], "inputs_changed": counts["inputs_changed"],
            "wall_s": wall, "pairs_per_s": len(todo) / wall if wall > 0 and todo else None,
            "image_size": int(cfg.image_size), "cam_method": cfg.cam.method,
            "cam_threshold": float(cfg.cam.cam_threshold), "eta": float(cfg.eta),
            "lung_conventions": conventions,
            "patient_files": [str(f) for f in patient_files],
            "channel": channel.describe() if channel is not None else
            getattr(getattr(source, "channel", None), "describe", lambda: "")(),
            "quality": int(quality or cfg.pairs.quality or 0) or None,
            "devices": jax.device_count(), "processes": jax.process_count(),
            "rows": str(store.path),
            # files the source itself rejected while listing (on_error="skip")
            "source_skipped": len(getattr(source, "skipped", ()) or ()),
            "source_skipped_examples": [f"{a}: {b}" for a, b in
                                        list(getattr(source, "skipped", ()) or ())[:5]],
            # files under the root that are not image files (never listed as pairs)
            "source_ignored": len(ignored),
            "source_ignored_examples": [f"{a}: {b}" for a, b in ignored[:5]]}
        if "lung_qc" in summary:
            summary["lung_qc"]["thresholds"] = dataclasses.asdict(scorer.qc_thresholds)
            summary["lung_qc"]["convention"] = conventions[0]
            summary["lung_qc"]["disagreement_checked"] = bool(
                "fields" in conventions and "anatomical" in conventions)
        selection, notes = gallery_selection(cfg, rows, names)
        finished.update(summary=summary, rows=rows, selection=selection, notes=notes)
        return sorted({i for s in selection.values() for v in s.values() for i in v})

    wanted = parallel.on_process0(summarise, "scoring summary")
    # every process runs the gallery's steps; process 0 loads the pairs
    panels = gallery_panels(cfg, scorer, source, channel, label_col, wanted)
    if p != 0:
        return {}
    summary = finished["summary"]
    gallery = gallery_from_panels(finished["selection"], finished["notes"], panels, names, scorer)
    report.write_report(workdir, summary, finished["rows"], gallery)
    write_json(workdir / "summary.json", summary)
    log.info("wrote %s, %s", workdir / "summary.json", workdir / "report.md")
    return summary


def write_patients(path: Path, patient_of: Mapping[str, str]) -> None:
    """``pair_id,patient`` of the selected pairs (``config.pairs.patients``), so that the rows
    can be summarised again with their patients (:func:`covidmt_jax.report.summarize`)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["pair_id", report.PATIENT_COLUMN])
        w.writerows(patient_of.items())
    os.replace(tmp, path)


def no_pairs_error(source) -> DataError:
    """The error of a job whose source lists no pair: names the root, the files skipped or
    ignored while listing, and why."""
    root = (getattr(source, "root", None) or getattr(source, "original_dir", None)
            or getattr(source, "name", "source"))
    skipped = list(getattr(source, "skipped", ()) or ())
    ignored = list(getattr(source, "ignored", ()) or ())
    parts = [f"no pairs to score: {len(skipped)} image file(s) skipped as unreadable or unpaired, "
             f"{len(ignored)} other file(s) ignored as not image files"]
    for what, items in (("skipped", skipped), ("ignored", ignored)):
        if items:
            parts.append(f"{what} e.g. " + "; ".join(f"{a} ({b})" for a, b in items[:3]))
    if not skipped and not ignored:
        parts.append("the folder holds no files")
    parts.append("set pairs.limit=0 to run on purpose with no pairs")
    return DataError(root, "; ".join(parts))


def check_same_pairs(source_name: str, ids: Sequence[str]) -> None:
    """Raise ``ConfigError`` in every process unless all processes list the same pairs."""
    if jax.process_count() == 1:
        return
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()
    every = parallel.allgather_json([len(ids), digest], f"pair listing of {source_name}")
    differ = [q for q, v in enumerate(every) if v != every[0]]
    if differ:
        raise ConfigError(
            f"{source_name}: process(es) {differ} list other pairs than process 0 (pairs per "
            f"process: {[v[0] for v in every]}); every process must read the same pair files")


def gallery_selection(cfg, rows: Mapping[str, np.ndarray], names: Sequence[str]
                      ) -> tuple[dict[str, dict[str, list[int]]], dict[int, str]]:
    """For each model, the source indices ``{"flipped": [...], "random": [...], "qc_flagged":
    [...]}`` of the first ``gallery.flipped`` flipped pairs, a seeded random sample of
    ``gallery.random`` scored pairs and the first ``gallery.qc_flagged`` pairs with a flagged
    lung mask on either side; and ``{index: note}`` with those pairs' flags. ``rows`` must hold
    each pair's CURRENT ``index`` in the source."""
    sel: dict[str, dict[str, list[int]]] = {}
    notes: dict[int, str] = {}
    rng = np.random.default_rng(cfg.seed)
    for m in names:
        ok = (rows["model"] == m) & (rows["error"] == "")
        flipped = np.sort(rows["index"][ok & (rows["flip"] == 1)])[:int(cfg.gallery.flipped)]
        pool = np.sort(rows["index"][ok])
        k = min(int(cfg.gallery.random), len(pool))
        rand = np.sort(rng.choice(pool, size=k, replace=False)) if k else np.zeros(0, np.int64)
        bad = ok & ((rows["qc_flags_orig"] != "") | (rows["qc_flags_trans"] != ""))
        order = np.argsort(rows["index"][bad], kind="stable")[:int(cfg.gallery.qc_flagged)]
        for j in np.flatnonzero(bad)[order]:
            notes[int(rows["index"][j])] = (f"QC {rows['qc_flags_orig'][j] or '-'} / "
                                            f"{rows['qc_flags_trans'][j] or '-'}")
        sel[m] = {"flipped": flipped.tolist(), "random": rand.tolist(),
                  "qc_flagged": np.sort(rows["index"][bad][order]).tolist()}
    return sel, notes


def gallery_panels(cfg, scorer: Scorer, source, channel, label_col,
                   wanted: Sequence[int]) -> dict[int, dict]:
    """``{index: panel}`` of images, CAMs, lung probabilities and outputs of the pairs at
    ``wanted`` source indices (pairs that fail to load are left out). Every process calls it
    with the same ``wanted`` and runs the same steps; process 0 loads the pairs and returns
    the panels, the others run on empty shares and return ``{}``."""
    ids, b, s = source.ids, scorer.local_batch, scorer.image_size
    loads = jax.process_index() == 0
    names = list(scorer.heads)
    panels: dict[int, dict] = {}
    for start in range(0, len(wanted), b):
        items = [pairs_lib.load_one(source, i, ids[i], cfg.image_size, channel, label_col, 0.0)
                 for i in wanted[start:start + b]] if loads else []
        items = [it for it in items if not it.error]
        empty = np.zeros((0, s, s, 1), np.float32)
        o, t = scorer(np.stack([it.original for it in items]) if items else empty,
                      np.stack([it.transmitted for it in items]) if items else empty,
                      return_maps=True)  # always called: every process runs every step
        for k, it in enumerate(items):
            panels[it.index] = {
                "pair_id": it.pair_id, "label": it.label,
                "image_orig": np.clip(denormalise(it.original[..., 0]), 0, 1),
                "image_trans": np.clip(denormalise(it.transmitted[..., 0]), 0, 1),
                "lung_orig": o["lung_prob"][k], "lung_trans": t["lung_prob"][k],
                **{f"{m}/{key}_{side}": d[m][key][k] for m in names for key in ("cam", "prob", "iol")
                   for side, d in (("orig", o), ("trans", t))}}
    return panels


def gallery_from_panels(sel: Mapping[str, Mapping[str, Sequence[int]]], notes: Mapping[int, str],
                        panels: Mapping[int, dict], names: Sequence[str], scorer: Scorer
                        ) -> dict[str, dict[str, list[dict]]]:
    """The report's galleries: for each model and kind (:func:`gallery_selection`), the panels
    of that model (:func:`gallery_panels`), with QC notes on the ``qc_flagged`` ones."""
    out = {}
    for m in names:
        out[m] = {}
        for kind, idx in sel[m].items():
            out[m][kind] = [{"pair_id": panels[i]["pair_id"], "label": panels[i]["label"],
                             "image_orig": panels[i]["image_orig"], "image_trans": panels[i]["image_trans"],
                             "lung_orig": panels[i]["lung_orig"], "lung_trans": panels[i]["lung_trans"],
                             **{f"{key}_{side}": panels[i][f"{m}/{key}_{side}"]
                                for key in ("cam", "prob", "iol") for side in ("orig", "trans")},
                             "threshold": scorer.heads[m].threshold,
                             **({"note": notes[i]} if kind == "qc_flagged" else {})}
                            for i in idx if i in panels]
    return out


def run(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """The scoring job (and the JPEG-quality sweep when ``pairs.qualities`` is set)."""
    validate(cfg)
    check_classifiers(cfg.classifiers)
    parallel.maybe_initialize_distributed()
    workdir = Path(workdir)
    check_workdir(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    loaded = load_models(cfg)
    written = []

    def write_config() -> None:  # once the job is accepted: a refused run leaves the old one
        if not written:
            write_json(workdir / "config.json", json.loads(cfg.to_json_best_effort()))
            written.append(True)

    if not cfg.pairs.qualities:
        return score_pairs(cfg, workdir, models=loaded, on_accept=write_config)
    mesh = parallel.make_mesh()
    per_quality = {}
    for q in sorted(int(q) for q in cfg.pairs.qualities):
        log.info("quality sweep: JPEG quality %d", q)
        per_quality[q] = score_pairs(cfg, workdir / f"q{q:03d}", quality=q, models=loaded, mesh=mesh,
                                     on_accept=write_config)
    if jax.process_index() != 0:
        return {}
    sweep = {"qualities": sorted(per_quality), "per_quality": per_quality}
    report.write_sweep_report(workdir, sweep)
    write_json(workdir / "summary.json", sweep)
    return sweep
