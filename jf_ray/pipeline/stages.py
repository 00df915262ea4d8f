"""The stages of the progressive job, each a small function over the config and earlier outputs.

Graph: ``base -> data -> round0.eval -> [roundK.collect -> roundK.pack -> roundK.train -> roundK.eval]* ->
bench -> report``. Round K collects with round K-1's model at its (larger) block size and continues
training from it. Every output lives under the run's storage URI.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from jf_ray.pipeline.config import PipelineConfig
from jf_ray.pipeline.estimate import REFERENCE_FP32_STEP_S, MachinePace, stage_seconds
from jf_ray.pipeline.graph import Stage
from jf_ray.pipeline.outputs import (
    OUTPUT_TYPES,
    BaseOutput,
    BenchOutput,
    BenchRound,
    CollectOutput,
    DataOutput,
    EvalOutput,
    PackOutput,
    ReportOutput,
    RunOutputs,
    StageOutput,
    TrainOutput,
    stage_name,
)
from jf_ray.storage import is_local, join_uri, local_path, upload_dir, write_bytes_atomic

logger = logging.getLogger(__name__)


def build_stages(cfg: PipelineConfig, pace: MachinePace | None = None) -> list[Stage]:
    """The job's stages, weighted by their estimated seconds at ``pace`` (default: a neutral pace; the
    job measures one with :func:`jf_ray.pipeline.estimate.measure_pace`)."""
    neutral = MachinePace(base_step_s=None if cfg.base.model else REFERENCE_FP32_STEP_S, speed=1.0)
    est = stage_seconds(cfg, pace or neutral)
    stages = [
        _stage(cfg, "base", None, lambda out: base_stage(cfg), est["base"]),
        _stage(cfg, "data", None, lambda out: data_stage(cfg), 5.0),
        _stage(cfg, "eval", 0, lambda out: eval_stage(cfg, 0, out), est["eval"]),
    ]
    for k in range(1, len(cfg.rounds) + 1):
        stages += [
            _stage(cfg, "collect", k, lambda out, k=k: collect_stage(cfg, k, out), est["collect"]),
            _stage(cfg, "pack", k, lambda out, k=k: pack_stage(cfg, k, out), 15.0),
            _stage(cfg, "train", k, lambda out, k=k: train_stage(cfg, k, out), est[stage_name("train", k)]),
            _stage(cfg, "eval", k, lambda out, k=k: eval_stage(cfg, k, out), est["eval"]),
        ]
    stages.append(_stage(cfg, "bench", None, lambda out: bench_stage(cfg, out), est["bench"]))
    stages.append(_stage(cfg, "report", None, lambda out: report_stage(cfg, out), 5.0))
    return stages


def _stage(
    cfg: PipelineConfig, kind: str, k: int | None, run: Callable[[RunOutputs], StageOutput], weight: float
) -> Stage:
    """A graph stage whose function sees the earlier outputs through :class:`RunOutputs`."""
    return Stage(
        stage_name(kind, k),
        lambda out: run(RunOutputs(out)),
        OUTPUT_TYPES[kind],
        weight,
        settings=stage_settings(cfg, kind, k),
        outputs_dir=join_uri(cfg.run_dir, f"round{k}", ROUND_DIRS[kind]) if kind in ROUND_DIRS else None,
    )


# Where a round's resumable stages write: what a rerun clears (the base build is a cache keyed by its own
# settings, and the other stages rewrite their files whole).
ROUND_DIRS = {"collect": "trajectories", "pack": "packed", "train": "train"}
# Collection settings that decide how fast, not what: a resumed run may change them.
_COLLECT_EXECUTION = {"workers", "num_cpus_per_worker"}


def stage_settings(cfg: PipelineConfig, kind: str, k: int | None) -> dict:
    """The config values a stage's result depends on; a resumed run refuses a stage recorded with others.

    A round's stages depend on earlier stages' results as well, but those are checked first, and a rerun of
    one clears every stage after it."""
    ev, rnd = cfg.evaluation, cfg.rounds[k - 1] if k else None
    if kind == "base":
        return {"base": cfg.base.model_dump(mode="json", exclude={"build_dir"}), "seed": cfg.seed}
    if kind == "data":
        return {"workloads": cfg.workloads.model_dump(mode="json"), "seed": cfg.seed}
    if kind == "collect":
        collect = cfg.collect.model_dump(mode="json", exclude=_COLLECT_EXECUTION)
        return {"collect": collect, "block_size": rnd.block_size}
    if kind == "pack":
        return {"pack": cfg.pack.model_dump(mode="json"), "window": rnd.window, "strategy": rnd.strategy}
    if kind == "train":
        return {"train": cfg.train.model_dump(mode="json"), "steps": rnd.steps, "lr": rnd.lr}
    if kind == "eval":  # greedy AR by default: the Jacobi settings matter only to a Jacobi-family decoder
        decode = _decode_arguments(cfg) if ev.round_decoder != "ar" else {"max_new_tokens": ev.max_new_tokens}
        return {"decode": decode, "decoder": ev.round_decoder, "batch_size": max(ev.batch_size, 16)}
    if kind == "bench":
        return {"evaluation": ev.model_dump(mode="json")}
    return {}


def base_stage(cfg: PipelineConfig) -> BaseOutput:
    """The given checkpoint, a known model fetched (``fetch://NAME``), or the embedded base built in a Ray task
    that holds a whole node's CPUs.

    The build and the fetch run outside this driver process: on a cluster the driver may run on a small head
    pod, and on one 2-core machine the same build trained about 20% slower in the driver (which carries the Ray
    core worker and the job's imports) than in a fresh process (docs/results.md)."""
    import ray

    from jf_ray.errors import UserInputError
    from jf_ray.model_fetch import is_fetch_reference
    from jf_ray.raycluster import largest_cpus

    if cfg.base.model is None:
        build = ray.remote(num_cpus=max(1, int(largest_cpus())), max_retries=0)(_build_base_task)
        return ray.get(build.remote(cfg))
    if not is_fetch_reference(cfg.base.model):
        return given_base_output(cfg)
    # max_calls=1: the worker exits after the fetch, giving back the ~2 GB a GGUF conversion peaks at.
    fetch = ray.remote(num_cpus=1, max_calls=1, max_retries=0)(_fetch_base_task)
    try:
        return ray.get(fetch.remote(cfg))
    except UserInputError as exc:  # Ray's wrapper subclasses the cause, but its text carries the remote traceback
        raise UserInputError(str(getattr(exc, "cause", exc))) from None


def given_base_output(cfg: PipelineConfig) -> BaseOutput:
    """An existing checkpoint as the base, with its provenance where it has one (a converted GGUF file)."""
    from jf_ray.gguf_checkpoint import read_provenance
    from jf_ray.modeling import local_model_path

    path = local_model_path(cfg.base.model)  # fails fast, naming the problem, if it is not a checkpoint
    return BaseOutput(model=cfg.base.model, built=False, provenance=read_provenance(path))


def _fetch_base_task(cfg: PipelineConfig) -> BaseOutput:
    from jf_ray.raycluster import show_info_logs_in_worker

    show_info_logs_in_worker()
    return fetch_base_output(cfg)


def fetch_base_output(cfg: PipelineConfig) -> BaseOutput:
    """The known model of ``base.model: fetch://NAME``, fetched into this node's cache once (a rerun or another
    run reuses it) and, for a run on object storage, copied under it so that every node reads the same files."""
    from jf_ray.gguf_checkpoint import read_provenance
    from jf_ray.modeling import local_model_path

    path = local_model_path(cfg.base.model)
    model = path
    if not is_local(cfg.run_dir):
        model = join_uri(cfg.run_dir, "base")
        upload_dir(Path(path), model)
    return BaseOutput(model=model, built=False, provenance=read_provenance(path))


def _build_base_task(cfg: PipelineConfig) -> BaseOutput:
    from jf_ray.raycluster import show_info_logs_in_worker

    show_info_logs_in_worker()
    return build_base_output(cfg)


def build_base_output(cfg: PipelineConfig) -> BaseOutput:
    """Build (or reuse) the base of ``cfg.base.preset`` and put it under the run directory."""
    from jf_ray.basemodel import build_base
    from jf_ray.basemodel.build import read_build_info

    build_dir = cfg.base.build_dir
    if build_dir is None:
        build_dir = (
            join_uri(cfg.run_dir, "base")
            if is_local(cfg.run_dir)
            else str(Path.home() / ".cache" / "jf_ray" / f"base-{cfg.base.preset}-{cfg.seed}")
        )
    overrides = cfg.base.override_args()
    path = build_base(
        local_path(build_dir), preset=cfg.base.preset, seed=cfg.seed, overrides=overrides, show_progress=True
    )
    model = str(path)
    if not is_local(cfg.run_dir):
        model = join_uri(cfg.run_dir, "base")
        upload_dir(path, model)
    precision = (read_build_info(path) or {}).get("preset", {}).get("precision")
    return BaseOutput(model=model, built=True, preset=cfg.base.preset, precision=precision)


def data_stage(cfg: PipelineConfig) -> DataOutput:
    """Collection prompts (train split), held-out evaluation sets and AR anchor pairs, as JSONL."""
    from jf_ray.workloads import load_examples, write_examples

    data_dir = join_uri(cfg.run_dir, "data")
    lines, evals, quality, anchors = [], {}, {}, []
    anchor_counts = cfg.workloads.anchors_per_task()
    for task in cfg.workloads.tasks:
        count = cfg.workloads.train_prompts.get(task, 0)  # 0: evaluated on, not trained on
        train = load_examples(task, "train", count, seed=cfg.seed) if count else []
        lines += [json.dumps({"id": f"{task}-{i:05d}", "prompt": ex.prompt}) for i, ex in enumerate(train)]
        evals[task] = _write_heldout(data_dir, "eval", task, cfg.workloads.benchmark_prompts(task), cfg.seed)
        if cfg.workloads.quality_prompts.get(task, 0):
            quality[task] = _write_heldout(data_dir, "quality", task, cfg.workloads.quality_prompts[task], cfg.seed + 2)
        if anchor_counts[task]:
            anchors += load_examples(task, "train", anchor_counts[task], seed=cfg.seed + 1)
    prompts_uri = cfg.workloads.prompts
    if prompts_uri is None:
        prompts_uri = join_uri(data_dir, "collect_prompts.jsonl")
        write_bytes_atomic(prompts_uri, ("\n".join(lines) + "\n").encode())
    anchor = join_uri(data_dir, "anchor.jsonl") if anchors else None
    if anchor:
        write_examples(anchor, anchors)
    return DataOutput(collect_prompts=prompts_uri, num_prompts=len(lines), eval=evals, quality=quality, anchor=anchor)


def collect_stage(cfg: PipelineConfig, k: int, outputs: RunOutputs) -> CollectOutput:
    from jf_ray.trajectories.collect import collect

    return CollectOutput.model_validate(collect(collect_config(cfg, k, outputs)))


def collect_config(cfg: PipelineConfig, k: int, outputs: RunOutputs):
    """Round ``k``'s CollectConfig: the ``collect:`` section, the round's block size, the previous model."""
    from jf_ray.trajectories.config import CollectConfig

    owned = {
        "model": outputs.model(k - 1),
        "prompts": outputs.data.collect_prompts,
        "out": join_uri(cfg.run_dir, f"round{k}", "trajectories"),
        "block_size": cfg.rounds[k - 1].block_size,
        "round": k,
        "model_id": f"round{k - 1}",
        "seed": cfg.seed,
        "resume": True,
        "ray_address": cfg.ray_address,
    }
    return CollectConfig.from_dict({**cfg.collect.model_dump(), **owned})


def pack_stage(cfg: PipelineConfig, k: int, outputs: RunOutputs) -> PackOutput:
    from jf_ray.packing import pack

    return PackOutput.model_validate(pack(pack_config(cfg, k, outputs)))


def pack_config(cfg: PipelineConfig, k: int, outputs: RunOutputs):
    """Round ``k``'s PackConfig: the ``pack:`` section, the round's window and strategy."""
    from jf_ray.packing.config import PackConfig

    rnd = cfg.rounds[k - 1]
    owned = {
        "trajectories": outputs.collect(k).out,
        "out": join_uri(cfg.run_dir, f"round{k}", "packed"),
        "window": rnd.window,
        "strategy": rnd.strategy,
        "seed": cfg.seed,
    }
    return PackConfig.from_dict({**cfg.pack.model_dump(), **owned})


def train_stage(cfg: PipelineConfig, k: int, outputs: RunOutputs) -> TrainOutput:
    from jf_ray.training import train

    return TrainOutput.model_validate(train(train_config(cfg, k, outputs)))


def train_config(cfg: PipelineConfig, k: int, outputs: RunOutputs):
    """Round ``k``'s TrainConfig: the ``train:`` section, the round's steps and lr, the previous model.

    Anchors are the data stage's pairs where ``train.anchor_ratio > 0`` and there are any (no anchor, no
    ratio: a config with ``anchor_examples: 0`` needs no ``anchor_ratio: 0``)."""
    from jf_ray.training.config import TrainConfig

    rnd = cfg.rounds[k - 1]
    anchor = outputs.data.anchor if cfg.train.anchor_ratio > 0 else None
    owned = {
        "model": outputs.model(k - 1),
        "data": outputs.pack(k).out,
        "out": join_uri(cfg.run_dir, f"round{k}"),
        "run_name": "train",
        "steps": rnd.steps,
        "lr": rnd.lr,
        "anchor": anchor,
        "seed": cfg.seed,
    }
    settings = cfg.train.model_dump()
    if not anchor:
        settings["anchor_ratio"] = 0.0
    return TrainConfig.from_dict({**settings, **owned})


def _eval_resources(cfg: PipelineConfig) -> dict:
    """One evaluation task: a GPU where collection uses them; else up to two train workers' CPUs, sized down
    to the biggest node of the cluster it runs on (not this machine's cores: the driver may be elsewhere)."""
    from jf_ray.raycluster import largest_cpus

    gpus = cfg.collect.num_gpus_per_worker
    if gpus:
        return {"num_gpus": gpus, "num_cpus": 1}
    wanted = min(cfg.evaluation.threads or 2 * cfg.train.cpus_per_worker, 2 * cfg.train.cpus_per_worker)
    return {"num_gpus": 0, "num_cpus": max(1, min(wanted, int(largest_cpus())))}


def check_cluster_fits(cfg: PipelineConfig) -> None:
    """Fail at the start, naming the request and the nodes, when a stage asks for more than any node has:
    Ray itself would wait forever on such a request (see docs/cluster.md)."""
    from jf_ray.raycluster import require_fit

    collect, train, evaluation = cfg.collect, cfg.train, _eval_resources(cfg)
    require_fit(
        {"CPU": collect.num_cpus_per_worker, "GPU": collect.num_gpus_per_worker},
        "a collection actor (collect.num_cpus_per_worker, collect.num_gpus_per_worker)",
    )
    require_fit(
        {"CPU": train.cpus_per_worker, "GPU": int(train.use_gpu)},
        "a training worker (train.cpus_per_worker, train.use_gpu)",
    )
    require_fit({"CPU": evaluation["num_cpus"], "GPU": evaluation["num_gpus"]}, "an evaluation task")


def _write_heldout(data_dir: str, name: str, task: str, n: int, seed: int) -> str:
    """``n`` held-out examples of ``task`` as ``<data_dir>/<name>_<task>.jsonl``; returns the URI."""
    from jf_ray.workloads import load_examples, write_examples

    uri = join_uri(data_dir, f"{name}_{task}.jsonl")
    write_examples(uri, load_examples(task, "heldout", n, seed=seed))
    return uri


def eval_stage(cfg: PipelineConfig, k: int, outputs: RunOutputs) -> EvalOutput:
    """Quality of round ``k``'s model on every task's quality set (the benchmark prompts where there is none)."""
    from jf_ray.pipeline.evaluate import evaluate_remote

    ev, model = cfg.evaluation, outputs.model(k)
    results = {}
    for task in outputs.data.eval:
        report = evaluate_remote(
            _eval_resources(cfg),
            model_uri=model,
            task=task,
            examples_uri=outputs.data.quality_set(task),
            decoders=[ev.round_decoder],
            batch_size=max(ev.batch_size, 16),
            seed=cfg.seed,
            threads=ev.threads,
            warmup=False,
            **_decode_arguments(cfg),
        )
        results[task] = report[ev.round_decoder]
    return EvalOutput(model=model, eval=results)


def _decode_arguments(cfg: PipelineConfig) -> dict:
    """The ``evaluation:`` section's DecodeConfig fields as :func:`evaluate_task` takes them."""
    decode = cfg.evaluation.decode_settings()
    return {"block_size": decode.pop("block_size"), "max_new_tokens": decode.pop("max_new_tokens"), "decode": decode}


def bench_stage(cfg: PipelineConfig, outputs: RunOutputs) -> BenchOutput:
    """Every model (base and each round) x task x decoder, timed back to back under the same conditions."""
    from jf_ray.pipeline.evaluate import evaluate_remote

    ev = cfg.evaluation
    rounds = []
    for k in range(len(cfg.rounds) + 1):
        model = outputs.model(k)
        per_task = {}
        for task, examples in outputs.data.eval.items():
            per_task[task] = evaluate_remote(
                _eval_resources(cfg),
                model_uri=model,
                task=task,
                examples_uri=examples,
                decoders=ev.decoders,
                batch_size=ev.batch_size,
                seed=cfg.seed,
                threads=ev.threads,
                repeats=ev.repeats,
                vllm_reference=ev.vllm_reference,
                vllm_eager=ev.vllm_eager,
                **_decode_arguments(cfg),
            )
        block_size = None if k == 0 else cfg.rounds[k - 1].block_size
        rounds.append(BenchRound(round=k, block_size=block_size, model=model, eval=per_task))
    return BenchOutput(rounds=rounds)


def report_stage(cfg: PipelineConfig, outputs: RunOutputs) -> ReportOutput:
    from jf_ray.pipeline.report import write_report

    return write_report(cfg, outputs)
