"""The shipped job configs validate, and round settings reach the training config as documented."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from jf_ray.config import ConfigError
from jf_ray.decoding import DecodeConfig
from jf_ray.packing.config import PackConfig
from jf_ray.pipeline import PipelineConfig, RunOutputs
from jf_ray.pipeline.config import WorkloadConfig
from jf_ray.pipeline.outputs import BaseOutput, CollectOutput, DataOutput, PackOutput, TrainOutput
from jf_ray.pipeline.sections import CollectSection, EvaluationSection, PackSection, TrainSection
from jf_ray.pipeline.stages import collect_config, pack_config, train_config
from jf_ray.training.config import TrainConfig
from jf_ray.trajectories.config import CollectConfig

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
    from jf_ray.pipeline.stages import build_base_output

    with pytest.raises(ValueError, match="stepz"):
        PipelineConfig.from_dict({"base": {"overrides": {"stepz": 3}}})
    cfg = PipelineConfig.from_dict(
        {"run_dir": str(tmp_path / "run"), "base": {"preset": "micro", "overrides": {"steps": 3, "lr": 1e-3}}}
    )
    built = build_base_output(cfg)
    preset = read_build_info(Path(built.model))["preset"]
    assert (preset["steps"], preset["lr"]) == (3, 1e-3)


def _outputs(**by_name) -> RunOutputs:
    return RunOutputs(by_name)


def test_round_settings_and_typed_train_fields_make_the_train_config():
    cfg = PipelineConfig.from_dict(
        {
            "run_dir": "/tmp/run",
            "rounds": [
                {"block_size": 16, "steps": 7, "lr": 1e-3},
                {"block_size": 32, "steps": 3, "lr": 5e-4},
            ],
            "train": {"precision": "bf16", "anchor_ratio": 0.5, "loss": {"ar_weight": 10.0, "positions": "all"}},
        }
    )
    data = DataOutput(collect_prompts="/p", num_prompts=1, eval={}, quality={}, anchor="/tmp/run/data/anchor.jsonl")
    trained = TrainOutput(model="/tmp/run/round1/ckpt/model", checkpoint="/tmp/run/round1/ckpt", metrics_log="/m")
    outputs = {"base": BaseOutput(model="/models/base", built=False), "data": data, "round1.train": trained}
    outputs["round2.pack"] = PackOutput(out="/tmp/run/round2/packed", packed=1, tokens=1)
    config = train_config(cfg, 2, _outputs(**outputs))
    # Round 2 starts from round 1's model files, not from the checkpoint root with its optimizer state.
    assert config.model == "/tmp/run/round1/ckpt/model" and config.data == "/tmp/run/round2/packed"
    assert (config.steps, config.lr, config.precision) == (3, 5e-4, "bf16")
    assert (config.anchor, config.anchor_ratio) == (data.anchor, 0.5)
    # A loss field set in the job keeps the others at LossConfig's defaults (consistency_weight 1).
    assert (config.loss.ar_weight, config.loss.positions, config.loss.consistency_weight) == (10.0, "all", 1.0)
    without_anchors = {**outputs, "data": data.model_copy(update={"anchor": None})}
    config = train_config(cfg, 2, _outputs(**without_anchors))
    assert (config.anchor, config.anchor_ratio) == (None, 0.0)


@pytest.mark.parametrize(
    ("section", "stage"),
    [
        (CollectSection, CollectConfig),
        (PackSection, PackConfig),
        (TrainSection, TrainConfig),
        (EvaluationSection, DecodeConfig),
    ],
    ids=["collect", "pack", "train", "evaluation"],
)
def test_sections_are_the_stage_configs_less_the_job_owned_fields(section, stage):
    stage_fields = set(stage.model_fields) - set(section.job_owned)
    assert set(section.model_fields) == stage_fields | set(section.__base__.model_fields)  # the job's own ones
    for name in stage_fields:  # one definition: the stage's defaults, descriptions and bounds
        field, original = section.model_fields[name], stage.model_fields[name]
        assert (field.default, field.description, field.metadata) == (
            original.default,
            original.description,
            original.metadata,
        )


def test_job_owned_fields_are_refused_naming_where_the_job_takes_them():
    with pytest.raises(ConfigError, match=r"collect: .*the job sets block_size \(from rounds.K.block_size\)"):
        PipelineConfig.from_dict({"collect": {"block_size": 8}})
    with pytest.raises(ConfigError, match=r"the job sets steps \(from rounds.K.steps\)"):
        PipelineConfig.from_dict({"train": {"steps": 8}})
    with pytest.raises(ConfigError, match="the job sets decoder"):
        PipelineConfig.from_dict({"evaluation": {"decoder": "jacobi"}})
    with pytest.raises(ConfigError, match=r"train.loss.consistency_weight: Input should be greater than or equal to 0"):
        PipelineConfig.load(None, ["train.loss.consistency_weight=-1"])
    with pytest.raises(ConfigError, match=r"collect.workers: Input should be greater than or equal to 1"):
        PipelineConfig.from_dict({"collect": {"workers": 0}})
    with pytest.raises(ConfigError, match=r"train.extra: Extra inputs are not permitted"):
        PipelineConfig.from_dict({"train": {"extra": {"checkpoint_every": 2}}})
    cfg = PipelineConfig.load(None, ["train.loss.consistency_weight=0.3", "pack.max_tokens=64"])
    assert (cfg.train.loss.consistency_weight, cfg.pack.max_tokens) == (0.3, 64)


def test_collect_and_pack_configs_take_the_round_and_the_sections():
    cfg = PipelineConfig.from_dict(
        {
            "run_dir": "/tmp/run",
            "seed": 3,
            "rounds": [{"block_size": 8, "window": 4, "strategy": "random"}],
            "collect": {"workers": 3, "dtype": "fp32"},
            "pack": {"max_tokens": 64},
        }
    )
    data = DataOutput(collect_prompts="/tmp/run/p.jsonl", num_prompts=1, eval={}, quality={}, anchor=None)
    collected = CollectOutput(out="/t", prompts=1, rows=1, tokens=1, forwards=1, tpf=1, tokens_per_s=1, wall_s=1)
    outputs = _outputs(base=BaseOutput(model="/models/base", built=False), data=data, **{"round1.collect": collected})
    collect = collect_config(cfg, 1, outputs)
    assert (collect.model, collect.prompts, collect.block_size, collect.round, collect.seed) == (
        "/models/base",
        "/tmp/run/p.jsonl",
        8,
        1,
        3,
    )
    assert (collect.workers, collect.dtype, collect.model_id, collect.out) == (
        3,
        "fp32",
        "round0",
        "/tmp/run/round1/trajectories",
    )
    pack = pack_config(cfg, 1, outputs)
    assert (pack.trajectories, pack.window, pack.strategy, pack.seed, pack.max_tokens) == ("/t", 4, "random", 3, 64)


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
                "quality_prompts": {"math": 1, "code": 0},
                "anchor_examples": {"math": 6},
            },
        }
    )
    assert cfg.workloads.anchors_per_task() == {"math": 6, "code": 0}
    outputs = data_stage(cfg)
    anchors = [json.loads(line) for line in read_bytes(outputs.anchor).decode().splitlines()]
    assert len(anchors) == 6 and all("How many" in a["prompt"] for a in anchors)
    assert outputs.num_prompts == 2 and set(outputs.eval) == {"math", "code"}  # code: evaluated only
    assert outputs.quality_set("code") == outputs.eval["code"]  # no quality set: the benchmark's examples
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


def test_benchmark_decode_settings_are_typed_and_checked_at_load():
    cfg = PipelineConfig.from_dict({"evaluation": {"num_blocks": 1, "pool_size": 1, "block_size": 8}})
    assert (cfg.evaluation.num_blocks, cfg.evaluation.pool_size, cfg.evaluation.block_size) == (1, 1, 8)
    assert cfg.evaluation.changed_decode_settings() == {"num_blocks": 1, "pool_size": 1}
    settings = cfg.evaluation.decode_settings()
    decode = DecodeConfig(decoder="jacobi", seed=0, **settings)
    assert decode.model_dump(exclude=set(EvaluationSection.job_owned)) == settings
    with pytest.raises(ValueError, match="pool_sise"):
        PipelineConfig.from_dict({"evaluation": {"pool_sise": 1}})
    with pytest.raises(ValueError, match="num_blocks"):
        PipelineConfig.from_dict({"evaluation": {"num_blocks": 0}})
    with pytest.raises(ValueError, match="the job sets seed"):
        PipelineConfig.from_dict({"evaluation": {"seed": 8}})


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
    stages = [Stage("first", lambda out: Count(), Count, 100.0), Stage("second", lambda out: Count(), Count, 300.0)]
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


class Count(BaseModel):
    n: int = 0
    names: list[str] = []


def test_typed_outputs_are_saved_and_read_back_when_a_resubmitted_run_skips_the_stage(tmp_path):
    from jf_ray.errors import UserInputError
    from jf_ray.pipeline.graph import Stage, run_graph

    calls = []

    def stages():
        first = Stage("first", lambda out: calls.append("first") or Count(n=2, names=["a"]), Count)
        second = Stage("second", lambda out: calls.append("second") or Count(n=out["first"].n + 1), Count)
        return [first, second]

    done = run_graph(str(tmp_path), stages())
    again = run_graph(str(tmp_path), stages())
    assert calls == ["first", "second"] and again.skipped == ["first", "second"]
    assert again.outputs == done.outputs == {"first": Count(n=2, names=["a"]), "second": Count(n=3)}
    (tmp_path / "stages" / "second.json").write_text('{"outputs": {"n": "many"}}')
    with pytest.raises(UserInputError, match="stage second .*--rerun second"):
        run_graph(str(tmp_path), stages())


def test_a_resubmission_with_other_settings_is_refused_naming_the_changes_and_rerun_starts_afresh(tmp_path):
    """A finished stage records the config values its result depends on: resubmitting the run with other
    values names the stage and what changed instead of reusing stale results; ``--rerun`` clears the stage's
    partial outputs (old shards, old checkpoints) so it does not resume from them."""
    from jf_ray.errors import UserInputError
    from jf_ray.pipeline.graph import Stage, invalidate_from, run_graph

    out_dir = tmp_path / "round1" / "train"

    def stages(steps: int):
        def train(out):
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f"checkpoint-{steps}").write_text("weights")
            return Count(n=steps)

        settings = {"train": {"steps": steps, "lr": 5e-4}}
        return [
            Stage("data", lambda out: Count(), Count, settings={"seed": 0}),
            Stage("train", train, Count, settings=settings, outputs_dir=str(out_dir)),
        ]

    run_graph(str(tmp_path), stages(300))
    assert run_graph(str(tmp_path), stages(300)).skipped == ["data", "train"]
    with pytest.raises(UserInputError, match=r"stage train .*train\.steps: 300 -> 400.*--rerun train") as refused:
        run_graph(str(tmp_path), stages(400))
    assert "lr" not in str(refused.value)  # only what changed
    assert (out_dir / "checkpoint-300").exists()  # nothing written is touched by a refusal
    assert invalidate_from(str(tmp_path), stages(400), "train") == ["train"]
    assert not out_dir.exists()
    redone = run_graph(str(tmp_path), stages(400))
    assert redone.skipped == ["data"] and redone.outputs["train"] == Count(n=400)
    assert sorted(p.name for p in out_dir.iterdir()) == ["checkpoint-400"]


def test_each_stage_records_only_the_settings_its_result_depends_on():
    from jf_ray.pipeline.stages import build_stages

    def settings(**changes):
        cfg = PipelineConfig.load(CONFIGS[[p.stem for p in CONFIGS].index("quickstart")])
        return {s.name: s.settings for s in build_stages(cfg.model_copy(update=changes))}

    quick = PipelineConfig.load(CONFIGS[[p.stem for p in CONFIGS].index("quickstart")])
    before = settings()
    rounds = [quick.rounds[0], quick.rounds[1].model_copy(update={"steps": 400})]
    changed = settings(rounds=rounds)
    assert [name for name in before if before[name] != changed[name]] == ["round2.train"]
    more_workers = settings(collect=quick.collect.model_copy(update={"workers": 8}))
    assert more_workers == before  # how fast, not what: a resumed run may scale collection out
    spawn = settings(evaluation=quick.evaluation.model_copy(update={"spawn_ratio": 0.25}))
    assert [name for name in before if before[name] != spawn[name]] == ["bench"]  # round evals decode with AR


def test_run_outputs_name_each_rounds_model_and_refuse_a_missing_stage():
    base = BaseOutput(model="/base", built=True, preset="tiny")
    trained = TrainOutput(model="/r1/model", checkpoint="/r1", metrics_log="/r1/m.jsonl", wall_s=1.0)
    outputs = _outputs(base=base, **{"round1.train": trained})
    assert [outputs.model(k) for k in (0, 1)] == ["/base", "/r1/model"]
    with pytest.raises(KeyError, match="round2.train"):
        outputs.model(2)


def test_loading_the_job_config_does_not_import_ray():
    """The job applies the local-cluster settings after loading its config and before Ray is first imported."""
    import subprocess
    import sys

    code = "import sys, jf_ray.pipeline; assert 'ray' not in sys.modules, 'ray imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
