"""Prompt sets kept as Hugging Face datasets, accepted wherever a prompts JSONL is (collection, ``jf-ray bench
decoders | collect | serve --prompts``, ``jf-ray eval --prompts``, the job's ``workloads.prompts``).

People keep prompt sets the way the hub keeps them: a hub dataset, a directory written by
``Dataset.save_to_disk``, Parquet, JSON or CSV files, with the prompt in a column of its own name. A reference
names the data and, after ``?``, how to read it (``key=value`` pairs joined by ``&``)::

    hf://datasets/openai/gsm8k?config=main&split=test&column=question   a dataset on the hub
    /data/my_set?split=test&template=Question: {question}               a save_to_disk directory
    prompts.parquet?column=text    rows.json    s3://bucket/set.csv?id=row_id

Keys: ``column`` (the prompt's column; default ``prompt``) or ``template`` (a format string over columns,
``{title}: {body}``); ``id`` (the column of stable prompt ids; default ``id`` where there is one, else a hash
of the prompt, as for JSONL); ``answer`` (``eval``: the column of reference answers; default ``answer``);
``split`` (required where a hub dataset or saved DatasetDict has several; a file's one split is ``train``);
``config`` (a hub dataset's configuration, e.g. gsm8k's ``main``). Values are percent-decoded: ``%26`` for
``&``, ``%25`` for ``%``, ``%23`` for ``#``; ``+`` stays a plus.

A reference goes through the ``datasets`` library when it is ``hf://datasets/...``, has a query, is a
directory, or ends in ``.parquet``, ``.json``, ``.csv`` or ``.tsv``; anything else (``.jsonl`` and other
names without a query) is read as the prompts JSONL it always was (:mod:`jf_ray.prompts`).
"""

from __future__ import annotations

import os
import string
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

from jf_ray.errors import UserInputError

if TYPE_CHECKING:
    from jf_ray.workloads.common import Example

HUB_PREFIX = "hf://datasets/"
FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv"}
KEYS = ("column", "template", "id", "answer", "split", "config")


@dataclass(frozen=True)
class DatasetSource:
    """A parsed reference: where the data is and the ``key=value`` options of its query."""

    reference: str
    location: str
    options: dict[str, str]

    @property
    def suffix(self) -> str:
        return Path(self.location.rstrip("/")).suffix.lower()


def parse_source(reference: str) -> DatasetSource | None:
    """The dataset ``reference`` names, or None where it is a prompts JSONL (read as before)."""
    location, _, query = reference.partition("?")
    source = DatasetSource(reference, location, parse_query(query, reference))
    if location.startswith(HUB_PREFIX) or query:
        return source
    if source.suffix in FILE_BUILDERS:
        return None if source.suffix == ".jsonl" else source
    return source if _is_directory(location) else None


def parse_query(query: str, reference: str) -> dict[str, str]:
    options = {}
    for pair in filter(None, query.split("&")):
        key, sep, value = pair.partition("=")
        if key not in KEYS or not sep:
            raise UserInputError(f"{reference}: {pair!r} is not one of {', '.join(k + '=...' for k in KEYS)}")
        options[key] = unquote(value)
    if "column" in options and "template" in options:
        raise UserInputError(f"{reference}: give column= or template=, not both")
    return options


def _is_directory(location: str) -> bool:
    from jf_ray.storage.uri import fs_and_path, is_local

    if is_local(location):
        return os.path.isdir(fs_and_path(location)[1])
    import pyarrow.fs as pafs

    fs, path = fs_and_path(location)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def dataset_prompts(source: DatasetSource) -> list[tuple[str, str | None, str]]:
    """``(where, id or None, prompt text)`` of every row, in the dataset's order."""
    rows, columns = load_rows(source)
    prompt_of = prompt_renderer(source, columns)
    id_column = source.options.get("id", "id" if "id" in columns else None)
    if id_column is not None and id_column not in columns:
        raise UserInputError(f"{source.reference}: no id column {id_column!r}; columns: {', '.join(columns)}")
    out = []
    for number, row in enumerate(rows, start=1):
        where = f"{source.reference} row {number}"
        raw_id = row[id_column] if id_column else None
        if raw_id is not None and not isinstance(raw_id, (str, int)):
            raise UserInputError(f"{where}: id {raw_id!r} must be a string or an integer")
        out.append((where, None if raw_id is None else str(raw_id), prompt_of(row, where)))
    return out


def dataset_example_rows(source: DatasetSource) -> list[dict]:
    """Rows as :func:`jf_ray.workloads.common.row_to_example` reads them: the rendered ``prompt``, the
    ``answer`` column's text, and the rest as they are (``test``, ``entry_point``, ``canonical_solution``)."""
    rows, columns = load_rows(source)
    prompt_of = prompt_renderer(source, columns)
    answer = source.options.get("answer")
    if answer is not None and answer not in columns:
        raise UserInputError(f"{source.reference}: no answer column {answer!r}; columns: {', '.join(columns)}")
    out = []
    for number, row in enumerate(rows, start=1):
        where = f"{source.reference} row {number}"
        fields = {**row, "prompt": prompt_of(row, where)}
        if answer is not None:
            fields["answer"] = _text(row[answer], where, answer)
        out.append(fields)
    return out


def read_example_set(reference: str) -> list[Example]:
    """The examples of ``jf-ray eval --prompts``: our JSONL (or HumanEval's row layout) as before, or a dataset's
    rows, each needing a reference answer or tests to be scored against."""
    from jf_ray.workloads.common import read_examples, row_to_example

    source = parse_source(reference)
    if source is None:
        return read_examples(reference)
    examples = []
    for number, row in enumerate(dataset_example_rows(source), start=1):
        try:
            examples.append(row_to_example(row))
        except ValueError as exc:
            raise UserInputError(f"{reference} row {number}: {exc}") from None
        if not examples[-1].answer and not examples[-1].tests:
            raise UserInputError(f"{reference} row {number}: no reference answer; name its column with ?answer=NAME")
    return examples


def prompt_renderer(source: DatasetSource, columns: list[str]) -> Callable[[dict, str], str]:
    """The row -> prompt text function the reference asks for (a column, or a template over columns)."""
    template = source.options.get("template")
    if template is None:
        column = source.options.get("column", "prompt")
        _require_columns(source, columns, [column])
        return lambda row, where: _text(row[column], where, column)
    fields = template_fields(template, source.reference)
    _require_columns(source, columns, fields)
    return lambda row, where: template.format_map({f: _text(row[f], where, f) for f in fields})


def template_fields(template: str, reference: str) -> list[str]:
    """The column names a template uses; positional (``{}``) and attribute or index fields are refused."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise UserInputError(f"{reference}: template {template!r} is not a format string ({exc})") from None
    bad = [name for name in names if not name or not name.replace("-", "_").replace(" ", "_").isidentifier()]
    if bad or not names:
        raise UserInputError(f"{reference}: template {template!r} must name columns, e.g. {{question}}")
    try:  # conversions and format specs are only checked when formatting: try it once with empty columns
        template.format_map(dict.fromkeys(names, ""))
    except (ValueError, KeyError, IndexError, AttributeError) as exc:
        raise UserInputError(f"{reference}: template {template!r} cannot be formatted ({exc!r})") from None
    return list(dict.fromkeys(names))


def _require_columns(source: DatasetSource, columns: list[str], needed: list[str]) -> None:
    missing = [name for name in needed if name not in columns]
    if missing:
        raise UserInputError(
            f"{source.reference}: no column {', '.join(map(repr, missing))}; columns: {', '.join(columns)} "
            "(name the prompt with ?column=NAME or ?template={NAME})"
        )


def _text(value, where: str, column: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise UserInputError(f"{where}: column {column!r} holds {type(value).__name__}, not text")


def load_rows(source: DatasetSource) -> tuple[list[dict], list[str]]:
    """Every row of the source's split, as dicts, and the column names."""
    datasets = _datasets_module()
    with tempfile.TemporaryDirectory(prefix="jf-prompts-") as scratch:
        try:
            dataset = one_split(_open(datasets, source, scratch), source)
            return dataset.to_list(), list(dataset.column_names)
        except UserInputError:
            raise
        except (OSError, ValueError, datasets.exceptions.DatasetsError) as exc:  # unreadable, unknown split, offline
            cause = f" ({exc.__cause__})" if exc.__cause__ else ""
            raise UserInputError(f"{source.reference}: cannot read it as a dataset: {exc}{cause}") from None


def _open(datasets, source: DatasetSource, scratch: str):
    """The dataset or DatasetDict behind the source; a file's conversion cache lives in ``scratch`` only."""
    split, location = source.options.get("split"), source.location
    if location.startswith(HUB_PREFIX):
        return datasets.load_dataset(location[len(HUB_PREFIX) :], source.options.get("config"), split=split)
    path = _local_copy(location, source.suffix in FILE_BUILDERS, scratch)
    if source.suffix in FILE_BUILDERS:
        builder, extra = FILE_BUILDERS[source.suffix], {"delimiter": "\t"} if source.suffix == ".tsv" else {}
        return datasets.load_dataset(builder, data_files=path, split=split or "train", cache_dir=scratch, **extra)
    if not os.path.isdir(path):
        raise UserInputError(f"{source.reference}: not found, or not a directory written by save_to_disk")
    return datasets.load_from_disk(path)


def _local_copy(location: str, is_file: bool, scratch: str) -> str:
    """A local path to read: the path itself, or a copy of a remote (``s3://``) file or directory."""
    from jf_ray.storage import read_bytes
    from jf_ray.storage.dirs import download_dir
    from jf_ray.storage.uri import fs_and_path, is_local

    if is_local(location):
        path = fs_and_path(location)[1]
        if is_file and not os.path.isfile(path):
            raise UserInputError(f"not found: {location}")
        return path
    if not is_file:
        return str(download_dir(location))
    path = os.path.join(scratch, Path(location).name)
    Path(path).write_bytes(read_bytes(location))
    return path


def one_split(loaded, source: DatasetSource):
    """The one split to read: the asked ``split``, or the only one there is."""
    split = source.options.get("split")
    if not hasattr(loaded, "keys"):  # a Dataset: load_dataset picked the split, or a saved single Dataset
        if split is not None and str(loaded.split) != split:
            holds = f"split {loaded.split} only" if loaded.split is not None else "one dataset without splits"
            raise UserInputError(f"{source.reference}: unknown split {split!r}; it holds {holds}")
        return loaded
    names = list(loaded.keys())
    if split is None and len(names) == 1:
        return loaded[names[0]]
    if split is None or split not in names:
        asked = "name one with ?split=NAME" if split is None else f"unknown split {split!r}"
        raise UserInputError(f"{source.reference}: {asked}; splits: {', '.join(names)}")
    return loaded[split]


def _datasets_module():
    try:
        import datasets
    except ModuleNotFoundError:
        raise UserInputError("prompt sets other than JSONL need the datasets package (pip install datasets)") from None
    return datasets
