"""JSON Lines input written by people (prompt sets, anchor sequences, example sets): one home for reading it.

Every problem is a :class:`~jf_ray.errors.UserInputError` naming the file and line, never another exception:
the CLI turns it into exit code 2. Lines end at ``\\n`` only (``\\r\\n`` too): JSON strings may hold U+2028,
U+0085 or other characters that :meth:`str.splitlines` would split a valid line at.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from jf_ray.errors import UserInputError


def jsonl_records(data: bytes, source: str) -> Iterator[tuple[str, Any]]:
    """``(where, parsed value)`` of every non-blank line; ``where`` is ``"<source> line <n>"``."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserInputError(f"{source} is not UTF-8 text (byte {exc.start})") from None
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            where = f"{source} line {number}"
            yield where, parse_json_line(line, where)


def parse_json_line(line: str, where: str) -> Any:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except ValueError as exc:  # an integer of more than 4300 digits (Python's int-to-text limit)
        raise UserInputError(f"{where}: not valid JSON ({exc})") from None
    except RecursionError:  # the decoder recurses once per nesting level
        raise UserInputError(f"{where}: JSON nested too deeply") from None
    return value


def require_text(value: Any, where: str, name: str) -> str:
    """``value`` as a string field of a record: a string that is valid Unicode (JSON's ``\\ud800`` escapes are
    not, and would fail later when the text is encoded)."""
    if not isinstance(value, str):
        raise UserInputError(f'{where}: "{name}" must be a string, got {type(value).__name__}')
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UserInputError(f'{where}: "{name}" holds an unpaired surrogate escape (\\ud800-\\udfff)') from None
    return value
