"""Command line of the scoring job (:mod:`covidmt_jax.scoring`)::

    python -m covidmt_jax.score --config configs/score_demo.py:model=runs/demo/export/best \
        --workdir runs/score_demo [--config.batch_size=16 --config.pairs.limit=200] [--verbose]

Re-running with the same ``--workdir`` resumes (:mod:`covidmt_jax.scoring.job`). Config mistakes
and unreadable pair folders print one or two lines and exit with status 2
(:mod:`covidmt_jax.cli`).
"""
from __future__ import annotations

import sys
from typing import Sequence

from covidmt_jax.cli import run_config_cli
from covidmt_jax.data.records import DataError
from covidmt_jax.scoring.job import run


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scoring CLI on ``argv`` (``argv[0]`` = program name; None = the command line)."""
    return run_config_cli(run, module="covidmt_jax.score", config_help="configs/score_<x>.py[:arg]",
                          workdir_help="output directory (re-use it to resume)", argv=argv,
                          input_errors=(DataError,))


if __name__ == "__main__":
    sys.exit(main())
