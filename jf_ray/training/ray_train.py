"""Ray Train layer of Jacobi Forcing training: a TorchTrainer around :func:`jf_ray.training.loop.run_loop`.

* Workers: DDP (gloo on CPU, nccl on GPU) or FSDP2 (``fully_shard`` per decoder layer) for models that do
  not fit one GPU; bf16 autocast on GPU; ``torch.set_num_threads`` = the CPUs Ray gave each worker.
* Data: each worker reads only its own rows of the packed dataset (:mod:`jf_ray.training.data`).
* Checkpoints: ``model/`` (Hugging Face files) and ``trainer/`` (optimizer, schedule, step) directories
  (:mod:`jf_ray.training.checkpoint`, docs/checkpoints.md) reported to Ray Train, which uploads them under
  ``<out>/<run_name>/checkpoint-<step>`` (``file://`` or ``s3://``) and keeps the last ``keep_checkpoints``.
  Re-running with the same ``out`` and ``run_name`` resumes from the latest one: Ray Train V2 restores its
  checkpoint list from storage and ``get_checkpoint()`` hands it to the workers.
* Failures: a worker that dies (a lost node, a killed process) restarts the worker group from the last
  checkpoint, up to ``max_failures`` times in one run (Ray Train's ``FailureConfig``); what it had logged
  past that checkpoint is dropped and recomputed, bit for bit (tests/test_train_faults.py).
* Metrics: every ``log_every`` steps to ``<out>/<run_name>/metrics.jsonl`` (rewritten atomically before
  each checkpoint is reported), every ``report_every`` steps to the Ray Train reporter. Ray Train V2 keeps in
  ``Result.metrics`` only metrics reported with a checkpoint, so the last step is always reported with one.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch

from jf_ray.errors import UserInputError
from jf_ray.training.config import TrainConfig

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def train(config: TrainConfig) -> dict:
    """Run training on the Ray cluster this process has joined (docs/cluster.md); returns the summary also written to
    ``<out>/<run_name>/summary.json``: final metrics, ``model`` (the URI of the model files, what consumers
    load), ``checkpoint`` (the checkpoint root, what a resume reads), tokens/s."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jf_ray.raycluster import require_fit
    from jf_ray.storage import fs_and_path, join_uri, write_json_atomic
    from jf_ray.training.checkpoint import MODEL_DIR

    check_inputs(config)
    filesystem, storage_path = fs_and_path(config.out)
    resources = {"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})}
    require_fit(resources, "a training worker")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config.model_dump(mode="json"),
        torch_config=TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=config.workers, use_gpu=config.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=config.run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
            failure_config=FailureConfig(max_failures=config.max_failures),
        ),
    )
    started = time.perf_counter()
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {config.run_name} finished without a checkpoint")
    checkpoint = checkpoint_uri(config.out, storage_path, result.checkpoint.path)
    summary = {
        "model": join_uri(checkpoint, MODEL_DIR),
        "checkpoint": checkpoint,
        "metrics": result.metrics,
        "wall_s": round(time.perf_counter() - started, 2),
        "run_uri": join_uri(config.out, config.run_name),
        "metrics_log": join_uri(config.out, config.run_name, METRICS_FILE),
    }
    write_json_atomic(join_uri(config.out, config.run_name, SUMMARY_FILE), summary)
    logger.info("training done: %s", summary["model"])
    return summary


def check_inputs(config: TrainConfig) -> None:
    """Fail on the driver, with a one-line message, before any worker starts (errors inside Ray Train
    workers come back wrapped in a training failure)."""
    from jf_ray.modeling import local_model_path
    from jf_ray.packing.schema import PACKED_SCHEMA
    from jf_ray.storage import exists, is_local, read_manifest

    manifest = read_manifest(config.data, PACKED_SCHEMA)
    if manifest["num_rows"] < config.workers:
        raise UserInputError(
            f"{config.data} holds {manifest['num_rows']} packed sequences, fewer than {config.workers} workers"
        )
    if "://" in config.model and not is_local(config.model):
        if not exists(config.model):
            raise UserInputError(f"model not found: {config.model}")
    else:
        local_model_path(config.model)
    if config.anchor and not exists(config.anchor):
        raise UserInputError(f"anchor file not found: {config.anchor}")


def checkpoint_uri(out: str, storage_path: str, checkpoint_path: str) -> str:
    """Map the checkpoint's filesystem path back into the scheme of ``out`` (file:// or s3://)."""
    from jf_ray.storage import join_uri

    relative = checkpoint_path[len(storage_path) :] if checkpoint_path.startswith(storage_path) else None
    if relative is None:
        raise RuntimeError(f"checkpoint {checkpoint_path} is outside the run storage {storage_path}")
    return join_uri(out, relative)


def train_loop_per_worker(config_dict: dict) -> None:
    """Body of every Train worker (lives in the installed package so workers can unpickle it)."""
    import ray.train
    import ray.train.torch

    from jf_ray.modeling import set_torch_threads
    from jf_ray.precision import resolve_precision
    from jf_ray.training.checkpoint import MODEL_DIR, load_training_state
    from jf_ray.training.data import MicroBatchStream, load_packed_sequences
    from jf_ray.training.loop import LoopState, build_optimizer, build_scheduler, run_loop

    config = TrainConfig.model_validate(config_dict)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    set_torch_threads(config.cpus_per_worker)
    torch.manual_seed(config.seed)
    device = ray.train.torch.get_device()
    # Resolved on the worker: its processor decides whether bf16 is native (jf_ray.precision).
    precision = resolve_precision(config.precision, str(device), "train")
    config = config.model_copy(update={"precision": precision.name})
    resume_dir = _restore_checkpoint_dir()
    model, tokenizer, model_dtype = load_model_for_training(
        resume_dir / MODEL_DIR if resume_dir else config.model, config
    )
    model = wrap_model(model, config, device)
    stream = MicroBatchStream(
        load_packed_sequences(config.data, rank, world),
        config,
        rank,
        anchors=_anchors(config, tokenizer),
        pad_token_id=getattr(tokenizer, "pad_token_id", None) or 0,
    )
    total_steps = stream.total_steps()
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, total_steps, config.warmup_ratio)
    state = LoopState()
    if resume_dir is not None:
        state = load_training_state(resume_dir, model, optimizer, scheduler)
        shutil.rmtree(resume_dir, ignore_errors=True)
    reporter = Reporter(config, model, tokenizer, optimizer, scheduler, total_steps, rank, model_dtype)
    reporter.restore_log(state.step)
    logger.info(
        "rank %d/%d: %d steps from step %d on %s, %s", rank, world, total_steps, state.step, device, precision.reason
    )
    run_loop(model, stream, optimizer, scheduler, config, total_steps, state, device, reporter.on_step)


def _restore_checkpoint_dir() -> Path | None:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    return Path(checkpoint.to_directory(tempfile.mkdtemp(prefix="jf-resume-")))


def _anchors(config: TrainConfig, tokenizer):
    if not config.anchor or config.anchor_ratio <= 0:
        return None
    from jf_ray.training.data import load_anchor_sequences

    return load_anchor_sequences(config.anchor, tokenizer, config.anchor_max_tokens, config.loss.ar_on_prompt)


def load_model_for_training(source: str | Path, config: TrainConfig):
    """fp32 master weights (bf16 happens in autocast), the tokenizer when the checkpoint has one, and the
    dtype the checkpoint stores its weights in (trained checkpoints keep it)."""
    from transformers import AutoModelForCausalLM

    from jf_ray.modeling import load_tokenizer, local_model_path
    from jf_ray.training.checkpoint import declared_dtype

    path = str(source) if isinstance(source, Path) else local_model_path(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation=config.attn_implementation
        )
    except OSError as exc:
        raise UserInputError(f"cannot load model {source}: {exc}") from None
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError, UserInputError) as exc:
        logger.warning("no tokenizer next to %s (%s); checkpoints will hold the model only", source, exc)
        tokenizer = None
    return model, tokenizer, declared_dtype(path)


def wrap_model(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.nn.Module:
    if config.strategy == "fsdp":
        return shard_model(model.to(device), bf16=config.use_gpu and config.precision != "fp32")
    import ray.train.torch

    return ray.train.torch.prepare_model(model, parallel_strategy="ddp")


def shard_model(model: torch.nn.Module, bf16: bool) -> torch.nn.Module:
    """FSDP2: shard each decoder layer (the classes transformers marks as not splittable), then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    kwargs = {"mp_policy": policy} if policy is not None else {}
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


class Reporter:
    """Per-step metrics to Ray Train and the metrics log; checkpoints on schedule and at the last step."""

    def __init__(
        self,
        config: TrainConfig,
        model,
        tokenizer,
        optimizer,
        scheduler,
        total_steps: int,
        rank: int,
        model_dtype: torch.dtype,
    ):
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.optimizer, self.scheduler = optimizer, scheduler
        self.total_steps, self.rank, self.model_dtype = total_steps, rank, model_dtype
        self.lines: list[str] = []
        self.started, self.first_step = time.perf_counter(), None  # the ETA: this run's own pace

    @property
    def log_uri(self) -> str:
        from jf_ray.storage import join_uri

        return join_uri(self.config.out, self.config.run_name, METRICS_FILE)

    def restore_log(self, step: int) -> None:
        """Keep the log lines of steps up to the resumed one (later ones were never checkpointed)."""
        from jf_ray.storage import exists, read_bytes

        if self.rank != 0 or step == 0 or not exists(self.log_uri):
            return
        lines = read_bytes(self.log_uri).decode().splitlines()
        self.lines = [line for line in lines if line and json.loads(line)["step"] <= step]

    def on_step(self, state, metrics: dict) -> None:
        import ray.train

        last = state.step == self.total_steps
        every = self.config.checkpoint_every
        checkpoint_now = last or (every > 0 and state.step % every == 0)
        log_now = checkpoint_now or state.step % self.config.log_every == 0
        report_now = checkpoint_now or state.step % self.config.report_every == 0
        if not (log_now or report_now):
            return
        metrics = {key: round(value, 6) if isinstance(value, float) else value for key, value in metrics.items()}
        metrics["total_steps"] = self.total_steps
        metrics["precision"] = self.config.precision
        if self.rank == 0 and log_now:
            self.lines.append(json.dumps(metrics, sort_keys=True))
            logger.info(
                "step %d/%d loss %.4f (pc %.4f ar %.4f) %.0f tok/s %s, %s left",
                state.step,
                self.total_steps,
                metrics["loss"],
                metrics["loss_consistency"],
                metrics["loss_ar"],
                metrics["tokens_per_s"],
                self.config.precision,
                self._time_left(state.step),
            )
        if checkpoint_now:
            self._report_with_checkpoint(state, metrics)
        elif report_now:
            # Each report is a barrier across workers through the controller (about a second on CPU), so
            # reporting every step would dominate small-model steps; the log file still gets every step.
            ray.train.report(metrics)

    def _time_left(self, step: int) -> str:
        """The rest of the run at the pace of this run's steps so far (the first one, which loads, excluded)."""
        if self.first_step is None or step <= self.first_step:
            self.first_step, self.started = step, time.perf_counter()
            return "?"
        per_step = (time.perf_counter() - self.started) / (step - self.first_step)
        minutes, seconds = divmod(round(per_step * (self.total_steps - step)), 60)
        return f"{minutes}m{seconds:02d}s"

    def _report_with_checkpoint(self, state, metrics: dict) -> None:
        import ray.train

        from jf_ray.storage import write_bytes_atomic
        from jf_ray.training.checkpoint import save_checkpoint

        with tempfile.TemporaryDirectory(prefix="jf-ckpt-") as directory:
            save_checkpoint(
                directory,
                self.model,
                self.tokenizer,
                self.optimizer,
                self.scheduler,
                state,
                self.config.model_dump(mode="json"),
                is_writer=self.rank == 0,
                model_dtype=self.model_dtype,
            )
            checkpoint = ray.train.Checkpoint.from_directory(directory) if self.rank == 0 else None
            # The log first: a worker killed between the two then leaves lines past the last checkpoint, which
            # the restarted worker drops (restore_log), instead of a checkpoint whose log lacks its last steps.
            if self.rank == 0:
                write_bytes_atomic(self.log_uri, ("\n".join(self.lines) + "\n").encode())
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint-{state.step:06d}")
