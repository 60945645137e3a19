"""Make a WaCXR-layout paired set from any image folder by simulating a messaging channel.

    python -m covidmt_jax.channel --preset whatsapp [--quality Q] SRC_DIR DST_DIR

writes, for every image under SRC_DIR (sub-folders such as ``0_NON_COVID/1_COVID-19`` are
kept as relative paths):

    DST_DIR/covid_binary_test/<relative path>            the original bytes, unchanged
    DST_DIR/covid_binary_test_<preset>/<relative path>   what the channel delivers (JPEG)

The transmitted file keeps the original file NAME (even ``.png``), as WaCXR does; readers
detect the format from the magic bytes. The output folder names can be changed with
``--original-name`` / ``--transmitted-name``. Files whose name is not an image name are
ignored (and counted). An unreadable image stops the run with an error naming the file,
unless ``--skip-bad`` is given: then bad files are listed at the end (exit status 3).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from covidmt_jax import channels
from covidmt_jax.data.records import IMAGE_EXTENSIONS, DataError, is_image_name

ORIGINAL_DIR = "covid_binary_test"
EXIT_SKIPPED = 3


def list_images(src: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other files) under ``src``, relative paths, sorted; hidden entries skipped."""
    imgs, other = [], []
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if f.startswith("."):
                continue
            rel = Path(root, f).relative_to(src)
            (imgs if is_image_name(f) else other).append(rel)
    return imgs, other


def _transmit_one(args: tuple[channels.Channel, str, str, str]) -> tuple[str, int, int, str | None]:
    """Copy one original and write its transmitted version. Returns (rel, bytes in, bytes
    out, problem or None); the transmitted file is written only when the image decodes."""
    channel, src, dst_orig, dst_tx = args
    try:
        payload = channel.transmit(src)
    except DataError as e:
        return src, os.path.getsize(src) if os.path.isfile(src) else 0, 0, e.problem
    Path(dst_orig).parent.mkdir(parents=True, exist_ok=True)
    Path(dst_tx).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst_orig)
    Path(dst_tx).write_bytes(payload)
    return src, os.path.getsize(dst_orig), len(payload), None


def make_pairs(src: str | os.PathLike, dst: str | os.PathLike, channel: channels.Channel, *,
               skip_bad: bool = False, workers: int = 1, original_name: str = ORIGINAL_DIR,
               transmitted_name: str | None = None, overwrite: bool = False,
               log=print, progress_every: int | None = None) -> dict:
    """Write the paired set (see the module docstring) and return a summary dict:
    ``{"n", "bytes_in", "bytes_out", "reduction_percent", "skipped": [(path, problem)],
    "ignored": [relative paths of non-image files], "original_dir", "transmitted_dir"}``.

    Raises :class:`DataError` for the first bad image unless ``skip_bad``.
    """
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if not src.is_dir():
        raise DataError(src, "source folder not found" if not src.exists() else "not a folder")
    if dst == src or src in dst.parents:
        raise ValueError(f"destination {dst} must not be the source folder or inside it")
    transmitted_name = transmitted_name or f"{original_name}_{channel.name}"
    out_orig, out_tx = dst / original_name, dst / transmitted_name
    if not overwrite:
        for d in (out_orig, out_tx):
            if d.is_dir() and any(d.iterdir()):
                raise FileExistsError(f"{d} exists and is not empty (pass overwrite=True / --overwrite)")
    rels, ignored = list_images(src)
    if not rels:
        raise DataError(src, f"no image files found (looked for names ending in {', '.join(IMAGE_EXTENSIONS)})")
    jobs = [(channel, str(src / r), str(out_orig / r), str(out_tx / r)) for r in rels]
    every = progress_every or max(1, -(-len(jobs) // 10))  # about ten progress lines
    n_ok, bytes_in, bytes_out, skipped = 0, 0, 0, []
    t0 = time.perf_counter()
    log(f"{channel.describe()}\n{len(jobs)} images: {src} -> {out_orig.name}/ + {out_tx.name}/ in {dst}")
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    results = pool.map(_transmit_one, jobs, chunksize=8) if pool else map(_transmit_one, jobs)
    try:
        for i, (path, nin, nout, problem) in enumerate(results, 1):
            if problem is not None:
                if not skip_bad:
                    raise DataError(path, problem + " (pass --skip-bad to list bad files and go on)")
                skipped.append((path, problem))
                log(f"  BAD {path}: {problem}")
            else:
                n_ok += 1
                bytes_in += nin
                bytes_out += nout
            if i % every == 0 or i == len(jobs):
                log(f"  [{i}/{len(jobs)}] {time.perf_counter() - t0:.1f}s  {_mb(bytes_in)} -> {_mb(bytes_out)}")
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    reduction = 100.0 * (1.0 - bytes_out / bytes_in) if bytes_in else 0.0
    log(f"{n_ok} pairs written: originals {_mb(bytes_in)}, transmitted {_mb(bytes_out)}: "
        f"size reduction {reduction:.1f} %")
    if ignored:
        log(f"ignored {len(ignored)} non-image file(s), e.g. {', '.join(map(str, ignored[:3]))}")
    if skipped:
        log(f"skipped {len(skipped)} bad file(s):")
        for p, msg in skipped:
            log(f"  {p}: {msg}")
    return {"n": n_ok, "bytes_in": bytes_in, "bytes_out": bytes_out, "reduction_percent": reduction,
            "skipped": skipped, "ignored": ignored, "original_dir": out_orig, "transmitted_dir": out_tx}


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m covidmt_jax.channel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC_DIR", help="folder of images (sub-folders kept)")
    p.add_argument("dst", metavar="DST_DIR", help="output folder for the paired set")
    p.add_argument("--preset", default="whatsapp",
                   help=f"channel preset: {', '.join(channels.available())} or jpegNN (default whatsapp)")
    p.add_argument("--quality", type=int, help="JPEG quality 1..100 (overrides the preset's)")
    p.add_argument("--max-side", type=int, help="long-side cap in pixels (overrides the preset's)")
    p.add_argument("--subsampling", choices=sorted(channels.SUBSAMPLINGS), help="chroma subsampling")
    p.add_argument("--progressive", action="store_true", help="progressive instead of baseline JPEG")
    p.add_argument("--skip-bad", action="store_true",
                   help="list unreadable images and go on (exit status 3) instead of stopping")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--original-name", default=ORIGINAL_DIR, help=f"originals folder (default {ORIGINAL_DIR})")
    p.add_argument("--transmitted-name", help="transmitted folder (default <original-name>_<preset>)")
    p.add_argument("--overwrite", action="store_true", help="write into non-empty output folders")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        channel = channels.get_channel(args.preset, quality=args.quality, max_side=args.max_side,
                                       subsampling=args.subsampling, progressive=args.progressive or None)
        summary = make_pairs(args.src, args.dst, channel, skip_bad=args.skip_bad, workers=args.workers,
                             original_name=args.original_name, transmitted_name=args.transmitted_name,
                             overwrite=args.overwrite)
    except (DataError, ValueError, KeyError, TypeError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    return EXIT_SKIPPED if summary["skipped"] else 0


if __name__ == "__main__":
    sys.exit(main())
