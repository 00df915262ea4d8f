"""Hostile input files of the CLI, fuzzed in-process with hypothesis: prompt JSONL, anchor JSONL, example JSONL,
the stage configs' YAML files and ``--set`` overrides, dataset references. Every bad input must be the
project's own error (UserInputError or ConfigError, exit code 2 in the CLI) naming the file and line or the
field, never another exception. Two real ``jf-ray`` processes check the exit code.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jf_ray.config import ConfigError
from jf_ray.errors import UserInputError

# Deterministic in CI: the same cases every run (a failure reproduces); the counts are what the report cites.
FUZZ = settings(
    max_examples=200, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
OUTCOMES: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def report_outcomes():
    """How many fuzz cases each loader accepted and rejected (``pytest -s`` shows them)."""
    yield
    print("\nfuzz outcomes:", json.dumps(dict(sorted(OUTCOMES.items())), indent=1))


SURROGATES = st.sampled_from(["\ud800", "a\udfffb", "\udbff"])
AWKWARD_TEXT = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["", " ", "\u2028", "a\u2029b", "\x85", "\x1c", "\r", "line\rbreak", "\x00", "é" * 3]),
    SURROGATES,
)
NUMBERS = st.one_of(
    st.integers(),
    st.sampled_from([10**30, -(10**30), 2**63, 2**64, -1, 0]),
    st.floats(allow_nan=True, allow_infinity=True),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, AWKWARD_TEXT)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(AWKWARD_TEXT, inner, max_size=4),
    max_leaves=12,
)


def record(fields: dict) -> st.SearchStrategy:
    """Objects with some of ``fields`` (valid values) and hostile values or unknown keys mixed in."""
    known = st.fixed_dictionaries({}, optional={name: st.one_of(value, JSON_VALUES) for name, value in fields.items()})
    return st.one_of(known, JSON_VALUES, st.dictionaries(AWKWARD_TEXT, JSON_VALUES, max_size=3))


def jsonl_line(value) -> bytes:
    """One line as people write it: JSON with raw non-ASCII (U+2028 included), or garbage."""
    if isinstance(value, bytes):
        return value
    text = json.dumps(value, ensure_ascii=False)  # NaN and Infinity too: Python's JSON, and people's
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: written as the escape \udXXX, as JSON encoders do
        return json.dumps(value).encode()


def jsonl_files(records: st.SearchStrategy, valid: st.SearchStrategy) -> st.SearchStrategy:
    """Files of mostly ``valid`` lines, with hostile ``records`` and raw garbage among them."""
    garbage = st.one_of(
        st.binary(max_size=20),
        st.sampled_from([b"\xff\xfe", b"{", b"[" * 5000 + b"]" * 5000, b'{"prompt": 1' + b"0" * 5000 + b"}"]),
    )
    return st.lists(st.one_of(valid, valid, records, garbage), min_size=0, max_size=6).map(
        lambda lines: b"\n".join(jsonl_line(v) for v in lines)
    )


def expect_user_error(call, where_hint: str, kind=UserInputError) -> str:
    """Run ``call``; 'ok' or the error kind. Any other exception fails the test."""
    try:
        call()
    except kind as exc:
        assert where_hint in str(exc), str(exc)
        return "rejected"
    return "accepted"


# ---------------------------------------------------------------------------------------------- JSONL
PROMPT_FIELDS = {"prompt": AWKWARD_TEXT, "id": st.one_of(AWKWARD_TEXT, st.integers())}


@FUZZ
@given(data=jsonl_files(record(PROMPT_FIELDS), st.builds(dict, prompt=st.text(min_size=1))))
def test_prompt_files_load_or_fail_naming_the_line(tmp_path_factory, data):
    from jf_ray.prompts import read_prompts

    path = tmp_path_factory.mktemp("p") / "prompts.jsonl"
    path.write_bytes(data)
    OUTCOMES["prompts " + expect_user_error(lambda: read_prompts(str(path)), str(path))] += 1


@FUZZ
@given(texts=st.lists(st.text(min_size=1).filter(str.strip), min_size=1, max_size=5, unique=True))
def test_valid_prompt_files_round_trip_whatever_characters_they_hold(tmp_path_factory, texts):
    """U+2028, U+0085 and friends inside a prompt are one line of JSONL, not a line break."""
    from jf_ray.prompts import read_prompts

    path = tmp_path_factory.mktemp("p") / "prompts.jsonl"
    lines = [json.dumps({"prompt": t, "id": i}, ensure_ascii=False) for i, t in enumerate(texts)]
    path.write_text("\r\n".join(lines) + "\n", encoding="utf-8")
    assert [p.text for p in read_prompts(str(path))] == texts


ANCHOR_FIELDS = {
    "text": AWKWARD_TEXT,
    "prompt": AWKWARD_TEXT,
    "answer": AWKWARD_TEXT,
    "input_ids": st.lists(st.integers(min_value=-5, max_value=300), max_size=8),
}


@FUZZ
@given(data=jsonl_files(record(ANCHOR_FIELDS), st.builds(dict, input_ids=st.lists(st.integers(0, 90), min_size=2))))
def test_anchor_files_load_or_fail_naming_the_line(tmp_path_factory, data):
    from jf_ray.training.data import load_anchor_sequences

    path = tmp_path_factory.mktemp("a") / "anchor.jsonl"
    path.write_bytes(data)
    OUTCOMES["anchors " + expect_user_error(lambda: load_anchor_sequences(str(path), None, 64, False), str(path))] += 1


EXAMPLE_FIELDS = {"prompt": AWKWARD_TEXT, "answer": AWKWARD_TEXT, "tests": AWKWARD_TEXT, "entry_point": AWKWARD_TEXT}


@FUZZ
@given(data=jsonl_files(record(EXAMPLE_FIELDS), st.builds(dict, prompt=st.text(), answer=st.text())))
def test_example_files_load_or_fail_naming_the_line(data):
    from jf_ray.workloads.common import jsonl_to_examples

    OUTCOMES["examples " + expect_user_error(lambda: jsonl_to_examples(data, "mine.jsonl"), "mine.jsonl")] += 1


def test_jsonl_problems_name_their_line(tmp_path):
    from jf_ray.prompts import read_prompts

    cases = {
        b'{"prompt": "a"}\n[' + b"[" * 100_000: "line 2: JSON nested too deeply",
        b'{"prompt": "a"}\n\n{"prompt": "\\ud800"}': 'line 3: "prompt" holds an unpaired surrogate',
        b'{"prompt": "a", "id": true}': 'line 1: "id" must be a string or an integer',
        b'{"prompt": 1' + b"0" * 5000 + b"}": "line 1: not valid JSON",
        b'{"prompt": "ok"}\n\xff': "is not UTF-8 text",
        b'{"prompt": ["a"]}': 'line 1: "prompt" must be a string, got list',
    }
    for data, message in cases.items():
        path = tmp_path / "p.jsonl"
        path.write_bytes(data)
        with pytest.raises(UserInputError, match=re.escape(message)):
            read_prompts(str(path))


# ---------------------------------------------------------------------------------------------- YAML configs
def config_classes():
    from jf_ray.packing.config import PackConfig
    from jf_ray.pipeline.config import PipelineConfig
    from jf_ray.serving.config import ServeConfig
    from jf_ray.training.config import TrainConfig
    from jf_ray.trajectories.config import CollectConfig

    return [ServeConfig, TrainConfig, PipelineConfig, CollectConfig, PackConfig]


def config_mappings(cls) -> st.SearchStrategy:
    """The config's required fields set, then some of its keys (or unknown ones) with hostile values."""
    required = {name: "/tmp/jf-fuzz" for name, info in cls.model_fields.items() if info.is_required()}
    keys = st.sampled_from(sorted(cls.model_fields))
    nested = st.dictionaries(st.one_of(keys, AWKWARD_TEXT), JSON_VALUES, max_size=3)
    changes = st.dictionaries(st.one_of(keys, AWKWARD_TEXT), st.one_of(JSON_VALUES, nested), max_size=3)
    return changes.map(lambda change: {**required, **change})


YAML_GARBAGE = st.sampled_from(
    [
        b"\xff\xfe not utf-8",
        b"[" * 600,
        b"a: [" + b"[" * 600 + b"]" * 601,
        b"a: 2024-13-45",
        b"a: !!binary 0",
        b"a: !!python/object:os.system ls",
        b"- 1\n- 2",
        b"a: &x [*x]",
        b"x: 1" + b"0" * 5000,
        b"? [a, b]\n: c",
        b"\t\x00",
    ]
)


def yaml_files(cls) -> st.SearchStrategy:
    def dump(mapping: dict) -> bytes:
        return yaml.safe_dump(mapping, allow_unicode=True).encode("utf-8", "surrogatepass")

    return st.one_of(config_mappings(cls).map(dump), YAML_GARBAGE, st.binary(max_size=40))


@pytest.mark.parametrize("index", range(5), ids=["serve", "train", "pipeline", "collect", "pack"])
def test_config_files_load_or_fail_with_a_config_error(tmp_path_factory, index):
    cls = config_classes()[index]

    @FUZZ
    @given(data=yaml_files(cls))
    def check(data):
        path = tmp_path_factory.mktemp("c") / "config.yaml"
        path.write_bytes(data)
        OUTCOMES[f"{cls.__name__} file " + expect_user_error(lambda: cls.load(path), "", ConfigError)] += 1

    check()


OVERRIDE_VALUES = st.one_of(
    AWKWARD_TEXT, st.sampled_from(["[" * 600, "2024-13-45", "1" * 5000, "{a: 1", "!!binary 0", ".nan", "-.inf"])
)


@pytest.mark.parametrize("index", range(5), ids=["serve", "train", "pipeline", "collect", "pack"])
def test_overrides_load_or_fail_with_a_config_error(index):
    cls = config_classes()[index]
    keys = st.one_of(st.sampled_from(sorted(cls.model_fields)), AWKWARD_TEXT, st.just("a.0.b"))

    @FUZZ
    @given(items=st.lists(st.tuples(keys, OVERRIDE_VALUES).map("=".join), max_size=4))
    def check(items):
        OUTCOMES[f"{cls.__name__} --set " + expect_user_error(lambda: cls.load(None, items), "", ConfigError)] += 1

    check()


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_batch_size", "-3"), ("port", "70000"), ("stream_interval_ms", ".nan"), ("decode", "[1]")],
)
def test_a_bad_config_value_names_its_field(tmp_path, field, value):
    from jf_ray.serving.config import ServeConfig

    path = tmp_path / "serve.yaml"
    path.write_text(f"model: /m\n{field}: {value}\n")
    with pytest.raises(ConfigError, match=field):
        ServeConfig.load(path)
    with pytest.raises(ConfigError, match=field):
        ServeConfig.load(None, ["model=/m", f"{field}={value}"])


# ---------------------------------------------------------------------------------------------- dataset refs
LOCATIONS = st.text(alphabet=st.characters(blacklist_characters=":?", blacklist_categories=["Cs"]), max_size=12)
QUERIES = st.lists(
    st.tuples(st.sampled_from(["column", "template", "id", "split", "colum", ""]), AWKWARD_TEXT).map("=".join),
    max_size=3,
).map("&".join)


@FUZZ
@given(location=LOCATIONS.map(lambda s: s + ".parquet"), query=QUERIES)
def test_dataset_references_parse_or_fail_naming_the_reference(location, query):
    from jf_ray.prompt_sources import parse_source, template_fields

    reference = f"{location}?{query}"
    try:
        source = parse_source(reference)  # None: read as a prompts JSONL
        template = source.options.get("template") if source else None
        if template is not None:
            names = template_fields(template, reference)
            template.format_map(dict.fromkeys(names, "text"))  # what was accepted renders
    except UserInputError as exc:
        assert reference in str(exc)
        OUTCOMES["dataset reference rejected"] += 1
    else:
        OUTCOMES["dataset reference accepted"] += 1


@pytest.mark.parametrize("template", ["{q!x}", "{q:d}", "{q:>{width}}", "{q.attr}", "{0}", "{}"])
def test_templates_that_cannot_render_are_refused_up_front(template):
    from jf_ray.prompt_sources import template_fields

    with pytest.raises(UserInputError, match="template"):
        template_fields(template, "set.parquet")


# ---------------------------------------------------------------------------------------------- real CLI
def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jf_ray.cli.main", *argv], capture_output=True, text=True, timeout=120)


def test_the_cli_exits_2_naming_the_line_or_field(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b'{"prompt": "fine"}\n{"prompt": "\\udc00"}\n')
    done = run_cli("bench", "decoders", "--model", str(tmp_path), "--prompts", str(prompts))
    assert done.returncode == 2, done.stderr
    assert f"{prompts} line 2" in done.stderr and "Traceback" not in done.stderr

    config = tmp_path / "serve.yaml"
    config.write_bytes(b"model: /m\nautoscaling:\n  max_replicas: " + b"[" * 1000)
    done = run_cli("serve", "--config", str(config))
    assert done.returncode == 2 and "nested too deeply" in done.stderr and "Traceback" not in done.stderr, done.stderr
