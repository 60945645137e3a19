"""The command-line runner shared by ``python -m covidmt_jax.train`` and ``python -m covidmt_jax.score``.

``run_config_cli(job, module=..., argv=None)`` gives both commands the same behaviour:

- ``--config FILE.py[:ARG]`` (``ml_collections`` config file, overrides ``--config.a.b=v``),
  ``--workdir DIR`` (required), ``--verbose``; ``--help`` / ``-h`` prints the usage, exit 0;
- a command line (``argv=None``) re-executes once with the glibc malloc settings of
  :mod:`covidmt_jax.cpu_malloc`;
- INFO logging to stdout with time stamps, library chatter (absl, orbax, grain, ...) at WARNING;
- a configuration mistake (unknown key, wrong type, bad value, a config file that does not load
  or raises, :class:`~covidmt_jax.config_lib.ConfigError`) prints ``<command>: bad config: ...``
  in one or two lines naming the key and the valid choices, and exits with status 2. The full
  traceback is printed only with ``--verbose`` or ``COVIDMT_VERBOSE=1``.
"""
from __future__ import annotations

import logging
import math
import os
import re
import sys
import traceback
from typing import Any, Callable, Sequence

import ml_collections
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from covidmt_jax.config_lib import ConfigError
from covidmt_jax.cpu_malloc import reexec_for_cpu

EXIT_CONFIG = 2
EXIT_RUN = 1
VERBOSE_ENV = "COVIDMT_VERBOSE"
_QUIET = ("absl", "orbax", "grain", "jax._src", "tensorflow_datasets")


def hms(seconds: float) -> str:
    """``H:MM:SS`` of a duration in seconds (``"?"`` for NaN / Inf)."""
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"


def quiet_libraries() -> None:
    """Keep orbax / grain / absl INFO chatter out of the progress log."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stdout, force=True)
    quiet_libraries()


# ---------------------------------------------------------------------------- error messages
def _overrides(argv: Sequence[str]) -> list[tuple[str, str]]:
    """``[(dotted key, raw flag)]`` of the ``--config.a.b=v`` arguments."""
    out = []
    for a in argv:
        m = re.match(r"--?config\.([^=]+)", a)
        if m:
            out.append((m.group(1), a))
    return out


def _base_config(argv: Sequence[str]) -> ml_collections.ConfigDict | None:
    """The config file's config without the overrides (None when it does not load)."""
    plain = [a for a in argv if not re.match(r"--?config\.", a)]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, sys_argv=plain)
    try:
        fv(plain, known_only=True)
        cfg = fv.config
        cfg.keys()
        return cfg
    except Exception:  # noqa: BLE001  the original error is reported instead
        return None


def _unknown_key_message(argv: Sequence[str]) -> str | None:
    """``unknown key ...; valid: [...]`` for the first override naming no config key."""
    cfg = _base_config(argv)
    if cfg is None:
        return None
    for dotted, raw in _overrides(argv):
        node, path = cfg, "config"
        for part in dotted.split("."):
            if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
                valid = sorted(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
                where = f"{path} has no key {part!r}" if valid else f"{path} is not a section"
                return f"{raw}: {where}; valid keys of {path}: {valid}"
            node, path = node[part], f"{path}.{part}"
    return None


def _type_hint(argv: Sequence[str], raw_flag: str) -> str:
    cfg = _base_config(argv)
    m = re.match(r"--?config\.([^=]+)", raw_flag)
    if cfg is None or not m:
        return ""
    node = cfg
    try:
        for part in m.group(1).split("."):
            node = node[part]
    except (KeyError, TypeError):
        return ""
    return f" (config.{m.group(1)} expects {type(node).__name__}, default {node!r})"


def _last_line(text: str) -> str:
    """The last line of a message or traceback text, without a leading ``module.Error: ``."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return re.sub(r"^[\w.]*(Error|Exception): ", "", lines[-1]) if lines else ""


def config_error_message(exc: BaseException, argv: Sequence[str]) -> str:
    """One or two lines naming the key and the problem of a failed config (see module doc)."""
    if isinstance(exc, ConfigError):
        return str(exc)
    text = str(exc)
    if isinstance(exc, flags.IllegalFlagValueError):
        m = re.match(r"flag (--?config\.[^=]+=[^:]*): (.*)", text, re.S)
        if m:  # a wrong type in an override
            return f"{m.group(1)}: {_last_line(m.group(2))}{_type_hint(argv, m.group(1))}"
        m = re.match(r"flag (--?config=[^:]+(?::\S*)?): ", text)
        head = m.group(1) if m else "--config"
        return f"{head}: {_last_line(text)}"
    if isinstance(exc, (AttributeError, KeyError)):
        msg = _unknown_key_message(argv)
        if msg:
            return msg
    if isinstance(exc, flags.Error):
        return _last_line(text)
    return f"{type(exc).__name__}: {_last_line(text)}"


# ---------------------------------------------------------------------------- the runner
def _verbose(argv: Sequence[str]) -> bool:
    return os.environ.get(VERBOSE_ENV) == "1" or any(a in ("--verbose", "-verbose", "--verbose=true")
                                                     for a in argv)


HELP_FLAGS = ("--help", "-help", "-h", "--helpfull", "--helpshort")


def usage(module: str, config_help: str, workdir_help: str) -> str:
    """The ``--help`` text of a config CLI (``module``: e.g. ``covidmt_jax.train``)."""
    return "\n".join([
        f"usage: python -m {module} --config {config_help} --workdir DIR "
        "[--config.<key>=VALUE ...] [--verbose]",
        "",
        f"  --config FILE.py[:ARG]    the config file ({config_help}); ARG is passed to its get_config()",
        "  --config.<key>=VALUE      override one config key (nested keys dotted: --config.a.b=VALUE;",
        "                            an unknown key is an error listing the valid ones)",
        f"  --workdir DIR             {workdir_help}",
        f"  --verbose                 full tracebacks of config errors (or {VERBOSE_ENV}=1)",
        "  -h, --help                this text",
        "",
        f"Exit status: 0 done, {EXIT_CONFIG} bad config or unreadable input (one line on stderr).",
    ])


def run_config_cli(job: Callable[[ml_collections.ConfigDict, str], Any], *, module: str,
                   config_help: str, workdir_help: str, argv: Sequence[str] | None = None,
                   input_errors: tuple[type[BaseException], ...] = (),
                   run_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Parse ``argv`` (``argv[0]`` is the program name; ``None``: the command line, after the
    malloc re-execution), run ``job(config, workdir)`` and return the exit status: 0, or
    :data:`EXIT_CONFIG` after a configuration mistake or one of ``input_errors`` (e.g. an
    unreadable input file), or :data:`EXIT_RUN` after one of ``run_errors`` (e.g. a
    non-finite loss), with a one-line message on stderr (the traceback only when verbose)."""
    if any(a in HELP_FLAGS for a in (sys.argv if argv is None else argv)[1:]):
        print(usage(module, config_help, workdir_help))
        return 0
    if argv is None:
        reexec_for_cpu(sys.argv[1:], module=module)
        argv = sys.argv
    argv = list(argv)
    prog = module.rsplit(".", 1)[-1]
    verbose = _verbose(argv)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, config_help, lock_config=True, flag_values=fv,
                                    sys_argv=argv)
    flags.DEFINE_string("workdir", None, workdir_help, flag_values=fv)
    flags.DEFINE_bool("verbose", False, f"full tracebacks of config errors (or {VERBOSE_ENV}=1)",
                      flag_values=fv)
    try:
        fv(argv)
        missing = [f"--{k}" for k in ("config", "workdir") if fv[k].value is None]
        if missing:
            raise flags.Error(f"{' and '.join(missing)} required: python -m {module} "
                              f"--config {config_help} --workdir DIR")
        cfg = fv.config
        cfg.keys()  # a config file that failed to load raises here
    except (flags.Error, ConfigError, AttributeError, KeyError, OSError, ValueError, TypeError) as e:
        return _config_failure(prog, e, argv, verbose)
    setup_logging()
    try:
        job(cfg, fv.workdir)
    except ConfigError as e:
        return _config_failure(prog, e, argv, verbose)
    except input_errors + run_errors as e:
        if verbose:
            traceback.print_exception(e, file=sys.stderr)
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_CONFIG if isinstance(e, input_errors) else EXIT_RUN
    return 0


def _config_failure(prog: str, exc: BaseException, argv: Sequence[str], verbose: bool) -> int:
    if verbose:
        traceback.print_exception(exc, file=sys.stderr)
    hint = "" if verbose else f" (full traceback: --verbose or {VERBOSE_ENV}=1)"
    print(f"{prog}: bad config: {config_error_message(exc, argv)}{hint}", file=sys.stderr)
    return EXIT_CONFIG
