"""Make a WaCXR-layout paired set from any image folder by simulating a messaging channel.

    python -m covidmt_jax.channel --preset whatsapp [--quality Q] SRC_DIR DST_DIR

writes, for every image under SRC_DIR (sub-folders such as ``0_NON_COVID/1_COVID-19`` are
kept as relative paths):

    DST_DIR/covid_binary_test/<relative path>            the original bytes, unchanged
    DST_DIR/covid_binary_test_<preset>/<relative path>   what the channel delivers (JPEG)

The transmitted file keeps the original file NAME (even ``.png``), as WaCXR does; readers
detect the format from the magic bytes. The output folder names can be changed with
``--original-name`` / ``--transmitted-name``. Files whose name is not an image name are
ignored (and counted); symbolic links to folders inside SRC_DIR are not followed. An
unreadable image stops the run with an error naming the file, unless ``--skip-bad`` is
given: then bad files are listed at the end (exit status 3).

Output safety:

- The set is built in a fresh hidden folder inside DST_DIR (files created exclusively, so
  nothing is ever written through a symbolic link) and renamed into place when complete:
  a failed or interrupted run leaves the previous output untouched.
- Non-empty output folders are refused unless ``--overwrite``; with it the two output
  folders are REPLACED (no file of an earlier run survives), other entries of DST_DIR are
  left alone.
- Refused before anything is written: SRC_DIR and DST_DIR overlapping in any form (the
  same folder, one inside the other, also through symbolic links or relative paths), a
  DST_DIR that is a symbolic link or contains one leading outside it, and an image in
  SRC_DIR that is a link into DST_DIR.
- Every file-system error is one line naming the path (exit status 2, no traceback).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from covidmt_jax import channels
from covidmt_jax.data.records import IMAGE_EXTENSIONS, DataError, is_image_name

ORIGINAL_DIR = "covid_binary_test"
EXIT_SKIPPED = 3
EXIT_ERROR = 2
_STAGE_PREFIX = ".channel-tmp-"


class OutputError(OSError):
    """A file-system problem: ``OutputError(path, problem)``; ``str(e) == f"{path}: {problem}"``."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path, self.problem = str(path), str(problem)
        super().__init__(f"{self.path}: {self.problem}")

    def __reduce__(self):  # picklable across worker processes
        return (type(self), (self.path, self.problem))


def _fs_error(e: OSError, path: str | os.PathLike | None) -> OutputError:
    """``e`` as an :class:`OutputError` naming its file (``path`` when ``e`` names none)."""
    if isinstance(e, OutputError):
        return e
    problem = e.strerror or str(e) or type(e).__name__
    if e.filename2 is not None:
        problem += f" (-> {e.filename2})"
    return OutputError(e.filename if e.filename is not None else path, problem)


def describe_os_error(e: OSError, path: str | os.PathLike | None = None) -> str:
    """One line for an ``OSError``: the path it concerns (``e.filename``, else ``path``) and
    the problem (``e.strerror``), e.g. ``"/out/x.png: Permission denied"``."""
    if not isinstance(e, OutputError) and e.filename is None and path is None:
        return e.strerror or str(e) or type(e).__name__
    return str(_fs_error(e, path))


def list_images(src: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other files) under ``src``, relative paths, sorted; hidden entries skipped."""
    imgs, other = [], []

    def fail(e: OSError) -> None:
        raise _fs_error(e, src)

    for root, dirs, files in os.walk(src, onerror=fail):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if f.startswith("."):
                continue
            rel = Path(root, f).relative_to(src)
            (imgs if is_image_name(f) else other).append(rel)
    return imgs, other


def _inside(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or below it (both resolved)."""
    return path == folder or folder in path.parents


def _link_target(link: Path) -> Path | None:
    """Where the symbolic link ``link`` finally leads (None for a loop)."""
    try:
        return link.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        return None


def check_paths(src: str | os.PathLike, dst: str | os.PathLike) -> tuple[Path, Path]:
    """Resolved ``(src, dst)`` after refusing every overlap of the two folders and a DST
    that is a symbolic link or contains one leading outside it (ValueError naming the
    path); a missing SRC is a :class:`DataError`."""
    src_p, dst_p = Path(src), Path(dst)
    try:
        src_r, dst_r = src_p.resolve(), dst_p.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
        raise OutputError(dst_p, f"cannot resolve the path: {e}") from None
    if not src_r.is_dir():
        raise DataError(src_p, "source folder not found" if not src_r.exists() else "not a folder")
    if src_r == dst_r:
        raise ValueError(f"SRC_DIR {src_p} and DST_DIR {dst_p} are the same folder ({src_r})")
    if src_r in dst_r.parents:
        raise ValueError(f"DST_DIR {dst_p} is inside SRC_DIR {src_p} (resolved: {dst_r} in {src_r})")
    if dst_r in src_r.parents:
        raise ValueError(f"SRC_DIR {src_p} is inside DST_DIR {dst_p} (resolved: {src_r} in {dst_r})")
    if dst_p.is_symlink():
        raise ValueError(f"DST_DIR {dst_p} is a symbolic link (to {dst_r}); give the folder itself")
    if dst_r.exists() and not dst_r.is_dir():
        raise OutputError(dst_p, "exists and is not a folder")
    if dst_r.is_dir():
        def fail(e: OSError) -> None:
            raise _fs_error(e, dst_r)

        for root, dirs, files in os.walk(dst_r, onerror=fail):
            for name in dirs + files:
                p = Path(root, name)
                if p.is_symlink():
                    target = _link_target(p)
                    if target is None or not _inside(target, dst_r):
                        where = f"to {target}" if target is not None else "a symbolic link loop"
                        raise ValueError(f"{p}: symbolic link leading outside DST_DIR ({where}); "
                                         "remove it or choose another DST_DIR")
    return src_r, dst_r


def _check_name(name: str, what: str) -> str:
    if not name or name in (".", "..") or "/" in name or os.sep in name or name.startswith(_STAGE_PREFIX):
        raise ValueError(f"{what} must be a plain folder name, got {name!r}")
    return name


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (exclusive: an existing file or link there is an error, never followed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "xb") as f:
        f.write(data)


def _transmit_one(args: tuple[channels.Channel, str, str, str]) -> tuple[str, int, int, str | None]:
    """Read one original, write it and its transmitted version (new files in the staging
    folder). Returns (src, bytes in, bytes out, problem or None); nothing is written when
    the image does not read or decode. File-system errors on the output: :class:`OutputError`."""
    channel, src, dst_orig, dst_tx = args
    try:
        data = Path(src).read_bytes()
    except OSError as e:
        return src, 0, 0, f"cannot read file: {e.strerror or e}"
    try:
        payload = channel.transmit(data, name=src)
    except DataError as e:
        return src, len(data), 0, e.problem
    for path, content in ((dst_orig, data), (dst_tx, payload)):
        try:
            _write_new(Path(path), content)
        except OSError as e:
            raise _fs_error(e, path) from None
    return src, len(data), len(payload), None


def _swap_in(stage: Path, dst: Path, names: tuple[str, ...]) -> None:
    """Rename the staged folders ``stage/<name>`` to ``dst/<name>``, moving what was there
    into ``stage`` (removed with it): each output folder is replaced in one rename."""
    for name in names:
        final, staged, old = dst / name, stage / name, stage / f"old-{name}"
        had_old = os.path.lexists(final)
        try:
            if had_old:
                os.rename(final, old)
            os.rename(staged, final)
        except OSError as e:
            if had_old and os.path.lexists(old) and not os.path.lexists(final):
                os.rename(old, final)  # put the previous output back
            raise _fs_error(e, final) from None


def make_pairs(src: str | os.PathLike, dst: str | os.PathLike, channel: channels.Channel, *,
               skip_bad: bool = False, workers: int = 1, original_name: str = ORIGINAL_DIR,
               transmitted_name: str | None = None, overwrite: bool = False,
               log=print, progress_every: int | None = None) -> dict:
    """Write the paired set (see the module docstring) and return a summary dict:
    ``{"n", "bytes_in", "bytes_out", "reduction_percent", "skipped": [(path, problem)],
    "ignored": [relative paths of non-image files], "original_dir", "transmitted_dir"}``.

    Raises :class:`DataError` for the first bad image unless ``skip_bad``, ValueError for
    overlapping or unsafe folders, FileExistsError for non-empty output folders without
    ``overwrite`` and :class:`OutputError` (an OSError naming the path) for file-system errors.
    """
    src, dst = check_paths(src, dst)
    transmitted_name = _check_name(transmitted_name or f"{original_name}_{channel.name}", "the transmitted folder name")
    original_name = _check_name(original_name, "the originals folder name")
    if original_name == transmitted_name:
        raise ValueError(f"the originals and transmitted folders have the same name {original_name!r}")
    out_orig, out_tx = dst / original_name, dst / transmitted_name
    if not overwrite:
        for d in (out_orig, out_tx):
            if d.is_dir() and any(d.iterdir()):
                raise FileExistsError(f"{d} exists and is not empty (pass overwrite=True / --overwrite)")
            if os.path.lexists(d) and not d.is_dir():
                raise FileExistsError(f"{d} exists and is not a folder (pass overwrite=True / --overwrite "
                                      "to replace it)")
    rels, ignored = list_images(src)
    if not rels:
        raise DataError(src, f"no image files found (looked for names ending in {', '.join(IMAGE_EXTENSIONS)})")
    for r in rels:
        target = _link_target(src / r) if (src / r).is_symlink() else None
        if target is not None and _inside(target, dst):
            raise ValueError(f"{src / r}: symbolic link into DST_DIR ({target}); SRC_DIR and DST_DIR must not overlap")
    try:
        dst.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=_STAGE_PREFIX, dir=dst))
    except OSError as e:
        raise _fs_error(e, dst) from None
    try:
        jobs = [(channel, str(src / r), str(stage / original_name / r), str(stage / transmitted_name / r))
                for r in rels]
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
        for name in (original_name, transmitted_name):  # an empty folder when every image was bad
            try:
                (stage / name).mkdir(exist_ok=True)
            except OSError as e:
                raise _fs_error(e, stage / name) from None
        _swap_in(stage, dst, (original_name, transmitted_name))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
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
    p.add_argument("--overwrite", action="store_true",
                   help="replace non-empty output folders (their old files are removed)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.preset == "jpeg" and args.quality is None:  # get_channel's message speaks Python
        parser.error("--preset jpeg needs --quality Q (1..100)")
    try:
        channel = channels.get_channel(args.preset, quality=args.quality, max_side=args.max_side,
                                       subsampling=args.subsampling, progressive=args.progressive or None)
        summary = make_pairs(args.src, args.dst, channel, skip_bad=args.skip_bad, workers=args.workers,
                             original_name=args.original_name, transmitted_name=args.transmitted_name,
                             overwrite=args.overwrite)
    except (DataError, ValueError, KeyError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:  # FileExistsError, OutputError, anything else from the file system
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return EXIT_ERROR
    sys.stdout.flush()
    return EXIT_SKIPPED if summary["skipped"] else 0


if __name__ == "__main__":
    sys.exit(main())
