"""Loading any workload by its name: the one place that knows every generator.

The generators import :mod:`jf_ray.workloads.common` and nothing here; this module imports them, so the
dependencies point one way (no lazy import back into a module that imports this one).
"""

from __future__ import annotations

from jf_ray.errors import UserInputError
from jf_ray.workloads.code import generate_code
from jf_ray.workloads.common import TEST_ONLY_TASKS, Example, Split, check_split
from jf_ray.workloads.humaneval import humaneval_examples
from jf_ray.workloads.math import generate_math
from jf_ray.workloads.stdlib import stdlib_examples
from jf_ray.workloads.tasks import check_task
from jf_ray.workloads.word_math import generate_word_math


def load_examples(task: str, split: Split, n: int, seed: int = 0) -> list[Example]:
    """``n`` examples of ``task``/``split`` (fewer where the set is smaller: stdlib functions, HumanEval)."""
    check_task(task)
    check_split(split)
    if n < 1:
        raise UserInputError(f"number of examples must be >= 1, got {n}")
    if task in TEST_ONLY_TASKS:
        if split != "heldout":
            raise UserInputError(f"{task} is a test set: it has only the heldout split")
        return humaneval_examples(n)
    if task == "math":
        return generate_math(n, split=split, seed=seed)
    if task == "wordmath":
        return generate_word_math(n, split=split, seed=seed)
    if task == "code":
        return generate_code(n, split=split, seed=seed)
    return stdlib_examples(split, n=n, seed=seed)
