"""Every task name the commands and configs accept: the embedded workloads and those for instruct models.

The embedded workloads' names stay in :mod:`jf_ray.workloads.common` (``TASKS``), whose source is part of the
embedded base model's build hash (:mod:`jf_ray.basemodel.build`): a name added there would invalidate every
cached base build, though no build trains on it. Workloads written for pretrained instruct models are added
here instead; :mod:`jf_ray.workloads.load` loads each name of :data:`ALL_TASKS`.
"""

from __future__ import annotations

from typing import Literal

from jf_ray.errors import UserInputError
from jf_ray.workloads.common import TASKS as EMBEDDED_TASKS

INSTRUCT_TASKS: tuple[str, ...] = ("wordmath",)  # plain-English word problems (jf_ray.workloads.word_math)
ALL_TASKS: tuple[str, ...] = EMBEDDED_TASKS + INSTRUCT_TASKS
Task = Literal[ALL_TASKS]


def check_task(task: str) -> None:
    if task not in ALL_TASKS:
        raise UserInputError(f"unknown task {task!r}; choose one of {', '.join(ALL_TASKS)}")
