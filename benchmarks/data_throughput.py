"""Data-loading throughput per worker: decode + augment images/s at 512 px.

What one grain worker does per training sample, on one core: read the record, decode the
image with the project's decoder and resize it to ``--size`` (:func:`data.images.load_grey`,
as the pipeline's ``SampleFn``), then the paper's augmentation
(:func:`data.augment.augment_sample`: affine + flip + zoom + intensity shift). Measured for

* ``files 1024px PNG``: phantoms rendered at ``--source_size`` (1024, the size of NIH's and
  most COVIDx PNGs) written as 8-bit PNG files to a temporary folder and read through
  :class:`ImageFolderSource` (the realistic no-build case: decode 1024 px, resize to 512);
* ``tfds ArrayRecord 512px``: the same images built once with
  :func:`data.tfds_builders.build_tfds` (square 512 px PNG) and read with
  :class:`TFDSSource` (``tfds.data_source``, random access);
* ``lungs_mc_sz_512 files`` / ``lungs_mc_sz_512 tfds``: the real Montgomery/Shenzhen images
  (512 px PNG) under ``../shared/data`` when present, image only and with the lung mask.

Records are read in a random order (as a shuffled grain pipeline does) after one warm-up
pass. The target of issue 3 is >= 80 images/s per worker from the ArrayRecord build.

Run from the repository root (the script re-executes itself once with the malloc settings of
covidmt_jax/cpu_malloc.py when they are missing: decoding is CPU work on any machine)::

    python -m benchmarks.data_throughput [--n 64] [--repeats 3] [--size 512]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from covidmt_jax.cpu_malloc import MALLOC_ENV, reexec_for_cpu  # noqa: E402

import numpy as np  # noqa: E402

from covidmt_jax.data import augment, images  # noqa: E402
from covidmt_jax.data.sources import get_source  # noqa: E402

SHARED_DATA = Path(os.environ.get("COVIDMT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def write_phantom_files(folder: Path, n: int, size: int, seed: int = 0) -> float:
    """``n`` COVIDx-like phantoms at ``size`` px as 8-bit PNG files; returns seconds taken."""
    src = get_source("synthetic_covidx", n=n, size=size, seed=seed, split="bench")
    folder.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    for i in range(n):
        (folder / f"{i:05d}.png").write_bytes(src[i]["image"])
    return time.perf_counter() - t


def sample_once(rec: dict, size: int, rng: np.random.Generator, with_mask: bool) -> tuple[float, float]:
    """Decode (+ resize) and augment one record; returns (decode s, augment s)."""
    t0 = time.perf_counter()
    sample = {"image": images.load_grey(rec["image"], size=size)}
    if with_mask:
        sample["mask"] = images.load_mask(rec["mask"], size=size)
    t1 = time.perf_counter()
    out = augment.augment_sample(sample, rng, augment.PAPER_AUGMENT)
    t2 = time.perf_counter()
    if out["image"].shape != (size, size):
        raise AssertionError(f"expected a {size}x{size} image, got {out['image'].shape}")
    return t1 - t0, t2 - t1


def measure(source, *, size: int, repeats: int, seed: int = 0, with_mask: bool = False) -> dict:
    """Per-image timings over ``repeats`` random-order passes (after one warm-up pass)."""
    n = len(source)
    rng = np.random.default_rng(seed)
    for i in range(min(n, 8)):  # warm-up: imports, page cache, reader open
        sample_once(source[i], size, rng, with_mask)
    read = dec = aug = 0.0
    count = 0
    t_all = time.perf_counter()
    for _ in range(repeats):
        for i in rng.permutation(n):
            t = time.perf_counter()
            rec = source[int(i)]
            read += time.perf_counter() - t
            d, a = sample_once(rec, size, rng, with_mask)
            dec, aug, count = dec + d, aug + a, count + 1
    total = time.perf_counter() - t_all
    return {"images": count, "ips": count / total, "ms": 1e3 * total / count, "read_ms": 1e3 * read / count,
            "decode_ms": 1e3 * dec / count, "augment_ms": 1e3 * aug / count}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=64, help="distinct images per source")
    p.add_argument("--repeats", type=int, default=3, help="random-order passes over them")
    p.add_argument("--size", type=int, default=512, help="training image size")
    p.add_argument("--source_size", type=int, default=1024, help="size of the phantom PNG files")
    p.add_argument("--no_real", action="store_true", help="skip ../shared/data/lungs_mc_sz_512")
    p.add_argument("--workdir", help="folder for the files and builds (default: a temporary folder)")
    args = p.parse_args(argv)
    reexec_for_cpu(sys.argv[1:] if argv is None else list(argv), script=__file__, any_backend=True)

    from covidmt_jax.data.tfds_builders import build_tfds

    rows = []
    notes = []
    with tempfile.TemporaryDirectory(prefix="covidmt_bench_") as tmp:
        work = Path(args.workdir or tmp)
        folder = work / f"phantoms_{args.source_size}"
        t_gen = write_phantom_files(folder, args.n, args.source_size)
        files = get_source("folder", root=folder)
        notes.append(f"wrote {args.n} phantom PNGs at {args.source_size} px in {t_gen:.1f} s "
                     f"({sum(f.stat().st_size for f in folder.iterdir()) / args.n / 1e3:.0f} kB each)")
        rows.append((f"files {args.source_size}px PNG -> {args.size}", measure(files, size=args.size, repeats=args.repeats)))

        t = time.perf_counter()
        build_tfds(files, name="bench_phantoms", data_dir=work / "tfds", image_size=args.size, overwrite=True)
        t_build = time.perf_counter() - t
        notes.append(f"tfds build of {args.n} images ({args.source_size} -> {args.size} px, 1 thread): "
                     f"{t_build:.1f} s = {args.n / t_build:.1f} images/s")
        tsrc = get_source("tfds", dataset="bench_phantoms", split="train", data_dir=work / "tfds")
        rows.append((f"tfds ArrayRecord {args.size}px", measure(tsrc, size=args.size, repeats=args.repeats)))

        lungs_root = SHARED_DATA / "lungs_mc_sz_512"
        if not args.no_real and lungs_root.is_dir():
            lungs = get_source("lungs", root=lungs_root)
            lungs = lungs.subset(np.linspace(0, len(lungs) - 1, min(args.n, len(lungs))).astype(int))
            rows.append(("lungs_mc_sz_512 files", measure(lungs, size=args.size, repeats=args.repeats)))
            rows.append(("lungs_mc_sz_512 files +mask", measure(lungs, size=args.size, repeats=args.repeats,
                                                               with_mask=True)))
            build_tfds(lungs, name="bench_lungs", data_dir=work / "tfds", image_size=args.size, overwrite=True)
            tl = get_source("tfds", dataset="bench_lungs", split="train", data_dir=work / "tfds")
            rows.append((f"lungs_mc_sz_512 tfds {args.size}px", measure(tl, size=args.size, repeats=args.repeats)))
            rows.append((f"lungs_mc_sz_512 tfds +mask", measure(tl, size=args.size, repeats=args.repeats,
                                                                with_mask=True)))
        elif not args.no_real:
            notes.append(f"{lungs_root} absent: real-image rows skipped")

    cpu = platform.processor() or platform.machine()
    print(f"# data throughput per worker (1 process, 1 thread), {args.size} px, decode + paper augmentation")
    print(f"# {cpu}, {os.cpu_count()} CPU(s), Python {platform.python_version()}, "
          f"{args.n} images x {args.repeats} random-order passes")
    for k in MALLOC_ENV:
        if os.environ.get(k) != MALLOC_ENV[k]:
            print(f"# warning: {k}={os.environ.get(k)!r}, not {MALLOC_ENV[k]} as in covidmt_jax/cpu_malloc.py")
    for note in notes:
        print(f"# {note}")
    head = f"{'source':<34} {'images/s/worker':>15} {'ms/image':>9} {'read':>7} {'decode':>7} {'augment':>8}"
    print(head)
    print("-" * len(head))
    for name, r in rows:
        print(f"{name:<34} {r['ips']:>15.1f} {r['ms']:>9.2f} {r['read_ms']:>7.2f} {r['decode_ms']:>7.2f} "
              f"{r['augment_ms']:>8.2f}")
    print("(read = fetching the record from the source; decode = decode + resize to the training size)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
