"""What a task is, without any JAX: the :class:`TaskSpec` and the paper's task list.

Models (COVIDMT builds its heads from the specs), the data pipeline (which columns and
targets a batch carries) and the configs import this module; the losses and metrics of each
task kind live in :mod:`covidmt_jax.tasks`. Standard library only.

The paper's six tasks (SPEC.md, Table 3), in the ablation's order:

| task          | dataset | kind           | label (the dataset's column) |
|---------------|---------|----------------|------------------------------|
| covid         | covidx  | classification | COVID-19                     |
| box           | rsna    | box            | pneumonia                    |
| infiltration  | nih     | classification | Infiltration                 |
| effusion      | nih     | classification | Effusion                     |
| atelectasis   | nih     | classification | Atelectasis                  |
| nodule        | nih     | classification | Nodule                       |

plus :data:`LUNG_TASK` (lung masks, the U-Net's segmentation task).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

__all__ = ["KINDS", "TaskSpec", "PAPER_TASKS", "LUNG_TASK", "paper_tasks", "tasks_from_names"]

KINDS = ("classification", "box", "segmentation")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task: ``name`` (output key), ``kind``, source ``dataset`` and the dataset's
    ``label`` column it learns (e.g. NIH ``"Effusion"``, COVIDx ``"COVID-19"``)."""
    name: str
    kind: str
    dataset: str
    label: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")


PAPER_TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("covid", "classification", "covidx", "COVID-19"),
    TaskSpec("box", "box", "rsna", "pneumonia"),
    TaskSpec("infiltration", "classification", "nih", "Infiltration"),
    TaskSpec("effusion", "classification", "nih", "Effusion"),
    TaskSpec("atelectasis", "classification", "nih", "Atelectasis"),
    TaskSpec("nodule", "classification", "nih", "Nodule"),
)
LUNG_TASK = TaskSpec("lungs", "segmentation", "lungs", "lung")
_BY_NAME = {t.name: t for t in PAPER_TASKS + (LUNG_TASK,)}


def paper_tasks(n: int = 6) -> tuple[TaskSpec, ...]:
    """The first ``n`` tasks of the paper's ablation order (COVID, box, Infiltration, ...)."""
    if not 1 <= n <= len(PAPER_TASKS):
        raise ValueError(f"the paper's ablation has 1..{len(PAPER_TASKS)} tasks, got {n}")
    return PAPER_TASKS[:n]


def tasks_from_names(tasks: Sequence[TaskSpec | str | Mapping[str, str]]) -> list[TaskSpec]:
    """Accept ``TaskSpec``s, names of known tasks, or dicts of ``TaskSpec`` fields."""
    out = []
    for t in tasks:
        if isinstance(t, TaskSpec):
            out.append(t)
        elif isinstance(t, str):
            if t not in _BY_NAME:
                raise ValueError(f"unknown task {t!r}; known: {sorted(_BY_NAME)} "
                                 "(or give a dict with name, kind, dataset, label)")
            out.append(_BY_NAME[t])
        else:
            out.append(TaskSpec(**dict(t)))
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate task names: {names}")
    return out
