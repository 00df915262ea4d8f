"""What every workload shares: the prompt/answer example, the split names, and JSONL export.

A workload example is a ``prompt`` (what the user sends; the chat template wraps it) and the reference
``answer`` (what the model should reply). The JSONL files written here (one ``{"prompt", "answer"}`` object a
line) are what ``jf-ray bench decoders``, trajectory collection and the pipeline read.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Literal

from jf_ray.errors import UserInputError
from jf_ray.jsonl import jsonl_records, require_text

Split = Literal["train", "heldout"]
SPLITS: tuple[str, ...] = ("train", "heldout")
TASKS: tuple[str, ...] = ("code", "math", "stdlib", "humaneval")  # the one list; jf_ray.workloads.load loads each
Task = Literal[TASKS]
TEST_ONLY_TASKS: tuple[str, ...] = ("humaneval",)  # no train split: evaluated on, never trained on
LOSS_TASKS: tuple[str, ...] = ("stdlib",)  # language-modelling sets: scored by the loss of the reference answers
HELDOUT_PERCENT = 10  # share of generated tasks and stdlib files in the heldout split


@dataclass(frozen=True)
class Example:
    """A prompt with its reference answer and, for executed code, hidden tests (``def check(candidate)``)
    and the name of the function they call."""

    prompt: str
    answer: str
    source: str = ""  # provenance where there is one (the stdlib file of a stdlib example)
    tests: str = ""
    entry_point: str = ""


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserInputError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def check_task(task: str) -> None:
    if task not in TASKS:
        raise UserInputError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def split_of(key: str) -> Split:
    """The split of a generated task or a stdlib file, from a hash of its key (the same on every machine)."""
    value = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big")
    return "heldout" if value % 100 < HELDOUT_PERCENT else "train"


def draw_distinct(
    workload: str, n: int, split: Split, seed: int, draw: Callable[[random.Random], tuple[str, Example]]
) -> list[Example]:
    """``n`` distinct examples of ``split``, deterministic for ``(workload, split, seed)``.

    ``draw`` gives one random example and the key that decides its split (:func:`split_of`); examples of the
    other split and repeated prompts are drawn again, so any seed gives fresh examples of the asked split.
    """
    check_split(split)
    rng = random.Random(f"{workload}/{split}/{seed}")
    seen: set[str] = set()
    out: list[Example] = []
    while len(out) < n:
        key, example = draw(rng)
        if split_of(key) != split or example.prompt in seen:
            continue
        seen.add(example.prompt)
        out.append(example)
    return out


def examples_to_jsonl(examples: Iterable[Example]) -> bytes:
    rows = ({k: v for k, v in asdict(example).items() if k in ("prompt", "answer") or v} for example in examples)
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    return ("\n".join(lines) + "\n").encode() if lines else b""


def jsonl_to_examples(data: bytes, source: str = "") -> list[Example]:
    examples = []
    for where, row in jsonl_records(data, source or "JSONL"):
        try:
            if not isinstance(row, dict):
                raise TypeError(f"got {type(row).__name__}")
            example = row_to_example(row)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserInputError(
                f"{where}: not a {{prompt, answer}} or {{prompt, tests, entry_point}} object ({exc})"
            ) from exc
        for name, value in asdict(example).items():
            require_text(value, where, name)
        examples.append(example)
    return examples


def row_to_example(row: dict) -> Example:
    """One JSONL object: ours (``answer``, ``tests``) or HumanEval's (``canonical_solution``, ``test``,
    ``task_id``). Tests need the ``entry_point`` they call."""
    tests = str(row.get("tests", row.get("test", "")))
    entry_point = str(row.get("entry_point", ""))
    if tests and not entry_point.isidentifier():
        raise ValueError("tests need an entry_point: the name of the function that check() is called on")
    return Example(
        prompt=str(row["prompt"]),
        answer=str(row.get("answer", row.get("canonical_solution", ""))),
        source=str(row.get("source", row.get("task_id", ""))),
        tests=tests,
        entry_point=entry_point,
    )


def write_examples(uri: str, examples: Iterable[Example]) -> int:
    """Write examples as JSONL to ``uri`` (file path, ``file://`` or ``s3://``) atomically; returns the count."""
    from jf_ray.storage.io import write_bytes_atomic

    examples = list(examples)
    write_bytes_atomic(uri, examples_to_jsonl(examples))
    return len(examples)


def read_examples(uri: str) -> list[Example]:
    from jf_ray.storage.io import read_bytes

    return jsonl_to_examples(read_bytes(uri), source=uri)
