"""Prompt input of bench, collection and serving benchmarks: a JSONL object at a URI, one
``{"prompt": str, "id"?: str|int}`` per line, or any Hugging Face dataset with a column or template naming
the prompt (a hub dataset, a ``save_to_disk`` directory, Parquet/JSON/CSV files; :mod:`jf_ray.prompt_sources`).

Prompt ids are stable across runs: the given ``id``, or a hash of the prompt text. Resume and the
"every prompt exactly once" guarantee are defined over these ids.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

from jf_ray.errors import UserInputError
from jf_ray.storage import read_bytes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str


def text_prompt_id(text: str) -> str:
    return "p-" + hashlib.sha256(text.encode()).hexdigest()[:20]


def parse_prompt_line(line: str, where: str) -> Prompt:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
        raise UserInputError(f'{where}: expected an object with a string "prompt"')
    raw_id = obj.get("id")
    if raw_id is not None and not isinstance(raw_id, (str, int)):
        raise UserInputError(f'{where}: "id" must be a string or an integer')
    return Prompt(id=str(raw_id) if raw_id is not None else text_prompt_id(obj["prompt"]), text=obj["prompt"])


def read_prompts(uri: str) -> list[Prompt]:
    """Prompts in file (or dataset) order; an exact repeat (same id and text) is kept once, a clashing id is an
    error."""
    prompts: dict[str, Prompt] = {}
    repeats = 0
    for where, prompt in located_prompts(uri):
        seen = prompts.get(prompt.id)
        if seen is not None and seen.text != prompt.text:
            raise UserInputError(f"{where}: id {prompt.id!r} is used by two different prompts")
        repeats += seen is not None
        prompts.setdefault(prompt.id, prompt)
    if not prompts:
        raise UserInputError(f"{uri} holds no prompts")
    if repeats:
        logger.warning("%s: %d repeated prompts kept once", uri, repeats)
    return list(prompts.values())


def located_prompts(uri: str) -> list[tuple[str, Prompt]]:
    """``(where, prompt)`` of every prompt: the lines of a prompts JSONL, or the rows of a dataset."""
    from jf_ray.prompt_sources import dataset_prompts, parse_source

    source = parse_source(uri)
    if source is None:
        return jsonl_prompts(uri)
    rows = dataset_prompts(source)
    return [(where, Prompt(text_prompt_id(text) if given is None else given, text)) for where, given, text in rows]


def jsonl_prompts(uri: str) -> list[tuple[str, Prompt]]:
    """``(where, prompt)`` of every non-blank line of a prompts JSONL."""
    try:
        text = read_bytes(uri).decode("utf-8")
    except UnicodeDecodeError:
        raise UserInputError(f"{uri} is not UTF-8 text") from None
    lines = ((number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip())
    return [(f"{uri} line {number}", parse_prompt_line(line, f"{uri} line {number}")) for number, line in lines]


def shard_prompts(prompts: list[Prompt], shard_size: int) -> list[tuple[str, list[Prompt]]]:
    """Consecutive shards of ``shard_size`` prompts named ``shard-00000``, ``shard-00001``, ..."""
    return [(f"shard-{i // shard_size:05d}", prompts[i : i + shard_size]) for i in range(0, len(prompts), shard_size)]
