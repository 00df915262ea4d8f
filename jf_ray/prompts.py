"""Prompt input of bench, collection and serving benchmarks: a JSONL object at a URI, one
``{"prompt": str, "id"?: str|int}`` per line, or any Hugging Face dataset with a column or template naming
the prompt (a hub dataset, a ``save_to_disk`` directory, Parquet/JSON/CSV files; :mod:`jf_ray.prompt_sources`).

Prompt ids are stable across runs: the given ``id``, or a hash of the prompt text. Resume and the
"every prompt exactly once" guarantee are defined over these ids.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from jf_ray.errors import UserInputError
from jf_ray.jsonl import jsonl_records, require_text
from jf_ray.storage import read_bytes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str


def text_prompt_id(text: str) -> str:
    return "p-" + hashlib.sha256(text.encode()).hexdigest()[:20]


def prompt_from_record(obj, where: str) -> Prompt:
    """One ``{"prompt": str, "id"?: str|int}`` record of a prompts JSONL."""
    if not isinstance(obj, dict) or "prompt" not in obj:
        raise UserInputError(f'{where}: expected an object with a string "prompt"')
    text = require_text(obj["prompt"], where, "prompt")
    raw_id = obj.get("id")
    if raw_id is None:
        return Prompt(id=text_prompt_id(text), text=text)
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):  # true/false are not ids
        raise UserInputError(f'{where}: "id" must be a string or an integer')
    return Prompt(id=require_text(str(raw_id), where, "id"), text=text)


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
    return [(where, prompt_from_record(obj, where)) for where, obj in jsonl_records(read_bytes(uri), uri)]


def shard_prompts(prompts: list[Prompt], shard_size: int) -> list[tuple[str, list[Prompt]]]:
    """Consecutive shards of ``shard_size`` prompts named ``shard-00000``, ``shard-00001``, ..."""
    return [(f"shard-{i // shard_size:05d}", prompts[i : i + shard_size]) for i in range(0, len(prompts), shard_size)]
