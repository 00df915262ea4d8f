"""The shipped job configs validate, and round settings reach the training config as documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from jf_ray.pipeline import PipelineConfig
from jf_ray.pipeline.config import WorkloadConfig
from jf_ray.pipeline.stages import train_config

CONFIGS = sorted((Path(__file__).parents[1] / "jobs" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_validate(path):
    cfg = PipelineConfig.load(path)
    assert cfg.rounds and all(a.block_size <= b.block_size for a, b in zip(cfg.rounds, cfg.rounds[1:]))


@pytest.mark.parametrize("name", ["quickstart", "full"])
def test_embedded_configs_build_the_small_base_with_two_growing_rounds(name):
    cfg = PipelineConfig.load(CONFIGS[[p.stem for p in CONFIGS].index(name)])
    assert cfg.base.model is None and cfg.base.preset == "small"
    assert [r.block_size for r in cfg.rounds] == [16, 32]


def test_base_overrides_change_the_built_preset_and_unknown_fields_fail_at_load(tmp_path):
    from jf_ray.basemodel.build import read_build_info
    from jf_ray.pipeline.stages import base_stage

    with pytest.raises(ValueError, match="stepz"):
        PipelineConfig.from_dict({"base": {"overrides": {"stepz": 3}}})
    cfg = PipelineConfig.from_dict(
        {"run_dir": str(tmp_path / "run"), "base": {"preset": "micro", "overrides": {"steps": 3, "lr": 1e-3}}}
    )
    built = base_stage(cfg)
    preset = read_build_info(Path(built["model"]))["preset"]
    assert (preset["steps"], preset["lr"]) == (3, 1e-3)


def test_round_settings_and_extra_loss_fields_merge_into_the_train_config():
    cfg = PipelineConfig.from_dict(
        {
            "run_dir": "/tmp/run",
            "rounds": [
                {"block_size": 16, "steps": 7, "lr": 1e-3},
                {"block_size": 32, "steps": 3, "lr": 5e-4},
            ],
            "train": {"ar_weight": 10.0, "extra": {"precision": "bf16", "loss": {"positions": "all"}}},
        }
    )
    outputs = {
        "base": {"model": "/models/base"},
        "data": {"anchor": "/tmp/run/data/anchor.jsonl"},
        "round1.train": {"checkpoint": "/tmp/run/round1/ckpt", "model": "/tmp/run/round1/ckpt/model"},
        "round2.pack": {"out": "/tmp/run/round2/packed"},
    }
    config = train_config(cfg, 2, outputs)
    # Round 2 starts from round 1's model files, not from the checkpoint root with its optimizer state.
    assert config.model == "/tmp/run/round1/ckpt/model" and config.data == "/tmp/run/round2/packed"
    assert (config.steps, config.lr, config.precision) == (3, 5e-4, "bf16")
    # extra.loss refines the loss settings; it does not drop the job-level ar_weight.
    assert config.loss.ar_weight == 10.0 and config.loss.positions == "all"


def test_relative_paths_become_absolute_because_ray_workers_run_elsewhere(tmp_path, monkeypatch):
    from jf_ray.training.config import TrainConfig
    from jf_ray.trajectories.config import CollectConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    assert PipelineConfig.from_dict({}).run_dir == str(tmp_path / "runs" / "default")
    train = TrainConfig(model="ckpt", data="run/packed", out="s3://bucket/run", anchor="data/anchor.jsonl")
    expected = (str(tmp_path / "ckpt"), str(tmp_path / "run/packed"), "s3://bucket/run")
    assert (train.model, train.data, train.out) == expected
    assert train.anchor == str(tmp_path / "data/anchor.jsonl")
    # A model that is not a local path is a hub name and stays as given.
    collect = CollectConfig(model="Qwen/Qwen2.5-Coder-7B-Instruct", prompts="p.jsonl", out="file:///abs/out")
    assert collect.model == "Qwen/Qwen2.5-Coder-7B-Instruct" and collect.out == "file:///abs/out"
    assert collect.prompts == str(tmp_path / "p.jsonl")


def test_anchor_examples_as_a_total_or_per_task(tmp_path):
    import json

    from jf_ray.pipeline.stages import data_stage
    from jf_ray.storage import read_bytes

    even = PipelineConfig.from_dict({"workloads": {"anchor_examples": 10}})
    assert even.workloads.anchors_per_task() == {"math": 5, "code": 5}
    cfg = PipelineConfig.from_dict(
        {
            "run_dir": str(tmp_path / "run"),
            "workloads": {
                "train_prompts": {"math": 2, "code": 0},
                "eval_prompts": {"math": 1, "code": 1},
                "anchor_examples": {"math": 6},
            },
        }
    )
    assert cfg.workloads.anchors_per_task() == {"math": 6, "code": 0}
    outputs = data_stage(cfg)
    anchors = [json.loads(line) for line in read_bytes(outputs["anchor"]).decode().splitlines()]
    assert len(anchors) == 6 and all("How many" in a["prompt"] for a in anchors)
    assert outputs["num_prompts"] == 2 and set(outputs["eval"]) == {"math", "code"}  # code: evaluated only
    with pytest.raises(ValueError, match="no collection prompt"):
        PipelineConfig.from_dict({"workloads": {"train_prompts": {"math": 0, "code": 0}}})
    with pytest.raises(ValueError, match="anchor_examples"):
        PipelineConfig.from_dict({"workloads": {"anchor_examples": {"poetry": 3}}})
    with pytest.raises(ValueError, match="anchor_examples"):
        PipelineConfig.from_dict({"workloads": {"anchor_examples": -1}})


def test_benchmark_prompts_are_typed_per_task_with_defaults():
    cfg = PipelineConfig.from_dict({"workloads": {"eval_prompts": {"math": 3}}})
    assert cfg.workloads.benchmark_prompts("math") == 3
    assert cfg.workloads.benchmark_prompts("code") == WorkloadConfig().eval_prompts["code"]
    with pytest.raises(ValueError, match="eval_prompts"):
        PipelineConfig.from_dict({"workloads": {"eval_prompts": {"poetry": 3}}})
    with pytest.raises(ValueError, match="eval_prompts"):
        PipelineConfig.from_dict({"workloads": {"eval_prompts": {"math": 0}}})


def test_benchmark_decode_settings_are_checked_at_load():
    cfg = PipelineConfig.from_dict({"evaluation": {"decode": {"num_blocks": 1, "pool_size": 1}}})
    assert cfg.evaluation.decode == {"num_blocks": 1, "pool_size": 1}
    with pytest.raises(ValueError, match="pool_sise"):
        PipelineConfig.from_dict({"evaluation": {"decode": {"pool_sise": 1}}})
    with pytest.raises(ValueError, match="num_blocks"):
        PipelineConfig.from_dict({"evaluation": {"decode": {"num_blocks": 0}}})
    with pytest.raises(ValueError, match="block_size"):
        PipelineConfig.from_dict({"evaluation": {"decode": {"block_size": 8}}})


def test_benchmark_decoders_are_checked_at_load():
    cfg = PipelineConfig.from_dict({"evaluation": {"decoders": ["ar", "rolling", "mr", "auto", "generate"]}})
    assert cfg.evaluation.decoders == ["ar", "rolling", "multiblock", "auto", "generate"]  # mr: an alias
    assert PipelineConfig.from_dict({"evaluation": {"round_decoder": "mr"}}).evaluation.round_decoder == "multiblock"
    with pytest.raises(ValueError, match="generat'"):
        PipelineConfig.from_dict({"evaluation": {"decoders": ["ar", "generat"]}})


def test_report_names_how_timed_runs_were_kept_and_rounds_numbers_by_size():
    from jf_ray.pipeline.report import _fmt, bench_settings

    evaluation = PipelineConfig.model_validate({"evaluation": {"repeats": 1}}).model_dump()["evaluation"]
    lines = {r: bench_settings({"evaluation": {**evaluation, "repeats": r}}) for r in (1, 2, 3)}
    assert lines[1].endswith("one timed run per decoder.")
    paired = "; speed-up: the median of each run's ratio to the AR run before it (lowest-highest in brackets)."
    assert lines[2].endswith("the faster of 2 interleaved timed runs per decoder" + paired)
    assert lines[3].endswith("the median of 3 interleaved timed runs per decoder" + paired)
    assert [_fmt(v) for v in (0.96512, 46.04, 452.6, None, 7)] == ["0.9651", "46.0", "453", "-", "7"]


def test_eta_starts_from_the_estimates_and_then_follows_the_observed_pace(tmp_path):
    import json

    from jf_ray.pipeline.graph import Stage, run_graph

    seen = []
    stages = [Stage("first", lambda out: {}, weight=100.0), Stage("second", lambda out: {}, weight=300.0)]
    run_graph(str(tmp_path), stages, on_progress=seen.append)
    first_seconds = json.loads((tmp_path / "stages" / "first.json").read_text())["seconds"]
    assert [p["eta_s"] for p in seen] == [400, round(300 * first_seconds / 100, 0), 0]
    assert json.loads((tmp_path / "progress.json").read_text())["stage"] == "done"


def test_stage_estimates_follow_the_config():
    from jf_ray.pipeline.stages import build_stages

    quick, full = (PipelineConfig.load(CONFIGS[[p.stem for p in CONFIGS].index(n)]) for n in ("quickstart", "full"))
    weights = {name: {s.name: s.weight for s in build_stages(cfg)} for name, cfg in (("q", quick), ("f", full))}
    assert weights["q"]["base"] < weights["f"]["base"]  # fewer pretraining steps
    assert weights["q"]["round1.train"] < weights["f"]["round1.train"]
    assert weights["q"]["bench"] < weights["f"]["bench"]
    given = PipelineConfig.from_dict({"base": {"model": "some/checkpoint"}})
    assert {s.name: s.weight for s in build_stages(given)}["base"] < 10  # nothing to build
