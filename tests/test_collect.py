"""Collection on a real local Ray cluster: fan-out, resume, killed actors, corrupt shards, S3 (moto), CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_trajectories import PROMPT_TEXTS, build_tiny_checkpoint, greedy_ar

from jf_ray.cli.main import main as cli_main
from jf_ray.errors import UserInputError
from jf_ray.modeling import encode_prompt, eos_token_ids, load_model, load_tokenizer
from jf_ray.storage import DatasetError, join_uri, read_dataset, write_bytes_atomic
from jf_ray.trajectories import TRAJECTORY_SCHEMA, CollectConfig, collect, text_prompt_id
from jf_ray.trajectories.ray_pool import CollectionFailed

MAX_NEW_TOKENS = 12
BLOCK_SIZE = 4
NUM_PROMPTS = 10


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"))


@pytest.fixture(scope="module")
def prompt_texts():
    # Distinct prompts; the odd ones carry an explicit id, the others are named by a hash of their text.
    return [f"{PROMPT_TEXTS[i % len(PROMPT_TEXTS)]} #{i}" for i in range(NUM_PROMPTS)]


def _prompt_ids(texts: list[str]) -> list[str]:
    return [f"q{i}" if i % 2 else text_prompt_id(t) for i, t in enumerate(texts)]


def _jsonl(texts: list[str]) -> bytes:
    lines = [{"prompt": t, "id": f"q{i}"} if i % 2 else {"prompt": t} for i, t in enumerate(texts)]
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


@pytest.fixture(scope="module")
def prompts_uri(tmp_path_factory, prompt_texts):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_bytes(_jsonl(prompt_texts))
    return f"file://{path}"


@pytest.fixture(scope="module")
def reference(checkpoint, prompt_texts):
    """Greedy AR responses (plain forwards, no cache) keyed by prompt id."""
    model, tokenizer = load_model(str(checkpoint), device="cpu"), load_tokenizer(str(checkpoint))
    eos = eos_token_ids(model, tokenizer)
    return {
        pid: greedy_ar(model, encode_prompt(tokenizer, text), MAX_NEW_TOKENS, eos)
        for pid, text in zip(_prompt_ids(prompt_texts), prompt_texts)
    }


def _config(checkpoint, prompts_uri, out, **overrides) -> CollectConfig:
    values = dict(
        model=str(checkpoint),
        prompts=prompts_uri,
        out=out,
        block_size=BLOCK_SIZE,
        max_new_tokens=MAX_NEW_TOKENS,
        workers=2,
        batch_size=2,
        shard_size=2,
        progress=False,
    )
    return CollectConfig(**{**values, **overrides})


def _check_dataset(out: str, reference: dict[str, list[int]]) -> None:
    """Every prompt exactly once, blocks in order, fixed points == greedy AR, noise ratio non-increasing."""
    table = read_dataset(out, schema=TRAJECTORY_SCHEMA)
    responses: dict[str, list[tuple[int, list[int]]]] = {}
    for row in table.to_pylist():
        responses.setdefault(row["prompt_id"], []).append((row["block_index"], row["fixed_point"]))
    assert sorted(responses) == sorted(reference)
    for pid, blocks in responses.items():
        assert sorted(i for i, _ in blocks) == list(range(len(blocks)))
        assert [t for _, fp in sorted(blocks) for t in fp] == reference[pid]


def test_collect_two_workers_then_rerun_skips_everything(ray_session, checkpoint, prompts_uri, reference, tmp_path):
    out = f"file://{tmp_path}/traj"
    summary = collect(_config(checkpoint, prompts_uri, out))
    assert (summary["prompts"], summary["shards"], summary["shards_run"], summary["retries"]) == (
        10,
        5,
        5,
        [],
    )
    assert sorted(w["worker"] for w in summary["workers"]) == [0, 1]
    assert summary["tokens"] == sum(len(r) for r in reference.values())
    assert all(w["tokens_per_s"] > 0 for w in summary["workers"])
    _check_dataset(out, reference)
    again = collect(_config(checkpoint, prompts_uri, out, workers=1))
    assert (again["shards_run"], again["shards_skipped"], again["rows"]) == (0, 5, summary["rows"])


def test_killed_actor_has_its_shard_retried(ray_session, checkpoint, prompts_uri, reference, tmp_path):
    import ray

    out = str(tmp_path / "traj")
    killed = []

    def kill_the_other_worker(report: dict) -> None:
        if not killed:  # the other actor is busy with its own shard (or about to get one)
            run_tag = report["actor"].rsplit("-w", 1)[0]  # names are <run tag>-w<slot>-g<generation>
            other = [name for name in _actor_names(ray, run_tag) if name != report["actor"]][0]
            ray.kill(ray.get_actor(other))
            killed.append(other)

    summary = collect(_config(checkpoint, prompts_uri, out), on_shard_done=kill_the_other_worker)
    assert killed and summary["retries"] and summary["retries"][0]["actor_died"]
    assert summary["shards_run"] == 5  # every shard written once more or less, never lost
    _check_dataset(out, reference)


def _actor_names(ray, prefix: str) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


class _Interrupt(Exception):
    pass


@pytest.mark.slow  # two collect runs, each starting fresh actors
def test_interrupted_run_resumes_and_redoes_a_corrupt_shard(ray_session, checkpoint, prompts_uri, reference, tmp_path):
    out = str(tmp_path / "traj")
    done = []

    def interrupt_after_three(report: dict) -> None:
        done.append(report["shard"])
        if len(done) == 3:
            raise _Interrupt()

    with pytest.raises(_Interrupt):
        collect(_config(checkpoint, prompts_uri, out), on_shard_done=interrupt_after_three)
    with pytest.raises(DatasetError, match="manifest.json missing"):
        read_dataset(out)
    shard = Path(out) / "shards" / f"{done[0]}.parquet"
    shard.write_bytes(shard.read_bytes()[:-50])  # truncated behind the writer's back
    summary = collect(_config(checkpoint, prompts_uri, out, workers=1))
    assert summary["shards_skipped"] >= 2 and summary["shards_run"] == 5 - summary["shards_skipped"]
    assert done[0] in summary["shard_names_run"]  # detected as truncated and redone
    assert not set(done[1:]) & set(summary["shard_names_run"])  # finished ones are skipped
    _check_dataset(out, reference)


@pytest.mark.slow  # three collect runs, each starting fresh actors
def test_resume_refuses_other_settings_and_a_fresh_start_forgets_old_shards(
    ray_session, checkpoint, prompts_uri, tmp_path
):
    out = str(tmp_path / "traj")
    collect(_config(checkpoint, prompts_uri, out, workers=1, shard_size=5))
    with pytest.raises(UserInputError, match="block_size: 4 -> 2"):
        collect(_config(checkpoint, prompts_uri, out, block_size=2, shard_size=5))

    def interrupt(report: dict) -> None:
        raise _Interrupt()

    fresh = _config(checkpoint, prompts_uri, out, workers=1, block_size=2, shard_size=5, resume=False)
    with pytest.raises(_Interrupt):  # one new shard written, then the driver dies
        collect(fresh, on_shard_done=interrupt)
    summary = collect(_config(checkpoint, prompts_uri, out, workers=1, block_size=2, shard_size=5))
    assert (summary["shards_run"], summary["shards_skipped"]) == (1, 1)  # the old block-4 shard is not reused
    assert set(read_dataset(out, columns=["block_size"]).column("block_size").to_pylist()) == {2}


def test_collect_to_s3_roundtrips(ray_session, s3_bucket, checkpoint, prompt_texts, reference):
    prompts = join_uri(s3_bucket, "in/prompts.jsonl")
    write_bytes_atomic(prompts, _jsonl(prompt_texts))
    out = join_uri(s3_bucket, "runs/r1/trajectories")
    summary = collect(_config(checkpoint, prompts, out, shard_size=4))
    assert summary["shards_run"] == 3
    _check_dataset(out, reference)


def test_a_failing_backend_fails_the_run_after_max_attempts(ray_session, prompts_uri, tmp_path):
    config = CollectConfig(
        model=str(tmp_path / "no_such_model"),
        prompts=prompts_uri,
        out=str(tmp_path / "t"),
        workers=1,
        shard_size=10,
        max_shard_attempts=2,
        progress=False,
    )
    with pytest.raises(CollectionFailed, match="failed 2 times.*model path not found"):
        collect(config)


def test_cli_collect(ray_session, checkpoint, prompts_uri, reference, tmp_path, capsys):
    out = str(tmp_path / "traj")
    argv = [
        "collect",
        "--model",
        str(checkpoint),
        "--prompts",
        prompts_uri,
        "--block-size",
        str(BLOCK_SIZE),
        "--out",
        out,
        "--workers",
        "2",
        "--batch-size",
        "3",
        "--max-new-tokens",
        str(MAX_NEW_TOKENS),
        "--set",
        "shard_size=5",
        "--no-progress",
    ]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "tok/s" in printed and "10 prompts" in printed
    _check_dataset(out, reference)
    assert cli_main(argv + ["--resume"]) == 0
    assert "2 skipped" in capsys.readouterr().out


def test_cli_bench_collect_reports_batch_and_worker_scaling(ray_session, checkpoint, prompts_uri, tmp_path):
    """Every run of the benchmark decodes the same prompts greedily: the same tokens at every setting."""
    report_path = tmp_path / "collect.json"
    argv = ["bench", "collect", "--model", str(checkpoint), "--prompts", prompts_uri, "--workers", "1"]
    argv += ["--batch-sizes", "1,4", "--shard-size", "5", "--block-size", str(BLOCK_SIZE)]
    argv += ["--max-new-tokens", str(MAX_NEW_TOKENS), "--scratch", str(tmp_path / "scratch")]
    assert cli_main([*argv, "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["benchmark"] == "collect" and report["num_prompts"] == NUM_PROMPTS
    rows = report["batch_scaling"] + report["worker_scaling"]
    assert [r["batch_size"] for r in report["batch_scaling"]] == [1, 4] and report["worker_scaling"][0]["workers"] == 1
    assert len({r["tokens"] for r in rows}) == 1 and rows[0]["tokens"] > 0
    assert report["worker_scaling"][0]["steady_tokens_per_s"] > 0 and "load_avg_end" in report["machine"]


def test_cli_bad_input_exits_2(tmp_path, capsys):
    argv = [
        "collect",
        "--model",
        "m",
        "--prompts",
        str(tmp_path / "missing.jsonl"),
        "--block-size",
        "4",
        "--out",
        str(tmp_path / "o"),
    ]
    assert cli_main(argv) == 2
    assert "not found" in capsys.readouterr().err
    assert cli_main(argv[:-2] + ["--out", str(tmp_path / "o"), "--block-size", "0"]) == 2
