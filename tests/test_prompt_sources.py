"""Prompt sets as Hugging Face datasets (save_to_disk dirs, Parquet, JSON, CSV) wherever a prompts JSONL goes."""

from __future__ import annotations

import json

import pytest

from jf_ray.errors import UserInputError
from jf_ray.prompt_sources import parse_source, read_example_set
from jf_ray.prompts import read_prompts, text_prompt_id

datasets = pytest.importorskip("datasets")

ROWS = {"qid": [7, 8, 9], "question": ["How many?", "Why?", "How many?"], "answer": ["#### 3", "4", "#### 3"]}


@pytest.fixture(scope="module")
def table():
    datasets.disable_progress_bars()
    return datasets.Dataset.from_dict(ROWS)


def test_saved_dataset_dir_with_a_column_and_ids(tmp_path, table):
    table.save_to_disk(str(tmp_path / "saved"))
    prompts = read_prompts(f"{tmp_path / 'saved'}?column=question&id=qid")
    assert [(p.id, p.text) for p in prompts] == [("7", "How many?"), ("8", "Why?"), ("9", "How many?")]


def test_parquet_file_with_a_template(tmp_path, table):
    table.to_parquet(str(tmp_path / "set.parquet"))
    prompts = read_prompts(f"{tmp_path / 'set.parquet'}?template=Q%3A {{question}} (id {{qid}})")
    assert [p.text for p in prompts] == ["Q: How many? (id 7)", "Q: Why? (id 8)", "Q: How many? (id 9)"]
    assert prompts[0].id == text_prompt_id("Q: How many? (id 7)")  # no id column: a hash, as for JSONL


def test_json_file_with_the_default_prompt_column(tmp_path):
    rows = [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "a"}]
    (tmp_path / "set.json").write_text(json.dumps(rows))
    prompts = read_prompts(str(tmp_path / "set.json"))
    assert [p.text for p in prompts] == ["a", "b"]  # an exact repeat is kept once, as for JSONL


def test_dataset_dict_split_is_chosen_or_asked_for(tmp_path, table):
    datasets.DatasetDict({"train": table, "test": table.select([1])}).save_to_disk(str(tmp_path / "dict"))
    assert [p.text for p in read_prompts(f"{tmp_path / 'dict'}?split=test&column=question")] == ["Why?"]
    with pytest.raises(UserInputError, match="name one with \\?split=NAME; splits: train, test"):
        read_prompts(f"{tmp_path / 'dict'}?column=question")
    with pytest.raises(UserInputError, match="unknown split 'dev'"):
        read_prompts(f"{tmp_path / 'dict'}?split=dev&column=question")


def test_clear_errors_for_bad_references(tmp_path, table):
    table.to_parquet(str(tmp_path / "set.parquet"))
    with pytest.raises(UserInputError, match="no column 'prompt'; columns: qid, question, answer"):
        read_prompts(str(tmp_path / "set.parquet"))
    with pytest.raises(UserInputError, match="no column 'title'"):
        read_prompts(f"{tmp_path / 'set.parquet'}?template={{title}}")
    with pytest.raises(UserInputError, match="unknown split 'test'|Unknown split"):
        read_prompts(f"{tmp_path / 'set.parquet'}?split=test&column=question")
    with pytest.raises(UserInputError, match="'colum=question' is not one of"):
        read_prompts(f"{tmp_path / 'set.parquet'}?colum=question")
    with pytest.raises(UserInputError, match="not found"):
        read_prompts(str(tmp_path / "missing.parquet"))
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(UserInputError, match="cannot read it as a dataset"):
        read_prompts(str(tmp_path / "bad.parquet"))


def test_jsonl_is_read_as_before_and_only_datasets_go_through_datasets(tmp_path):
    assert parse_source(str(tmp_path / "p.jsonl")) is None and parse_source(str(tmp_path / "p.txt")) is None
    assert parse_source("hf://datasets/openai/gsm8k?config=main&split=test").options == {
        "config": "main",
        "split": "test",
    }
    assert parse_source(f"{tmp_path / 'p.jsonl'}?column=q").options == {"column": "q"}


def test_eval_examples_from_a_dataset_with_answers(tmp_path, table):
    table.to_csv(str(tmp_path / "set.csv"), index=False)
    examples = read_example_set(f"{tmp_path / 'set.csv'}?column=question")
    assert [(e.prompt, e.answer) for e in examples] == [("How many?", "#### 3"), ("Why?", "4"), ("How many?", "#### 3")]
    with pytest.raises(UserInputError, match="no answer column 'solution'"):
        read_example_set(f"{tmp_path / 'set.csv'}?column=question&answer=solution")


def test_files_and_saved_dirs_on_s3(tmp_path, table, s3_bucket):
    from jf_ray.storage import write_bytes_atomic
    from jf_ray.storage.dirs import upload_dir

    table.to_parquet(str(tmp_path / "set.parquet"))
    write_bytes_atomic(f"{s3_bucket}/sets/set.parquet", (tmp_path / "set.parquet").read_bytes())
    assert len(read_prompts(f"{s3_bucket}/sets/set.parquet?column=question")) == 2
    table.save_to_disk(str(tmp_path / "saved"))
    upload_dir(tmp_path / "saved", f"{s3_bucket}/sets/saved")
    assert [p.text for p in read_prompts(f"{s3_bucket}/sets/saved?column=question")] == ["How many?", "Why?"]
