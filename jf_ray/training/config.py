"""Typed config of the training stage (``jf-ray train`` and :func:`jf_ray.training.train`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from jf_ray.config import Location, ModelLocation, StageConfig

MaskKind = Literal["nc", "clean_context", "nc_ic"]  # noise-aware mask variants (jf_ray.training.masks)
Reduction = Literal["token", "block"]  # consistency-loss normalisation (jf_ray.training.losses)
ConsistencyPositions = Literal["from_divergence", "all"]  # consistency pairs (jf_ray.training.batches)


class LossConfig(StageConfig):
    """What the Jacobi Forcing objective looks like; see :mod:`jf_ray.training.losses` for the formulas."""

    ar_weight: float = Field(1.0, ge=0.0, description="w in L = L_pc + w * L_AR (1 = default, 10 = alternative)")
    consistency_weight: float = Field(
        1.0, ge=0.0, description="weight of L_pc (1 = the method; 0 = AR-only fine-tuning, the control run)"
    )
    temperature: float = Field(1.0, gt=0.0, description="distillation temperature tau of the consistency loss")
    reduction: Reduction = Field(
        "token", description="consistency normalisation: token = mean over pairs; block = paper Eq. 8"
    )
    positions: ConsistencyPositions = Field(
        "from_divergence",
        description="consistency pairs: from each block's first divergence (official) or all",
    )
    ar_on_prompt: bool = Field(False, description="also train next-token prediction on prompt tokens")
    anchor_weight: float = Field(1.0, ge=0.0, description="weight of the AR loss on anchor sequences")


class MaskConfig(StageConfig):
    kind: MaskKind = Field(
        "nc", description="nc = noise-conditioned (main method); clean_context = CLLM-style; nc_ic = windowed"
    )
    window: int = Field(16, ge=1, description="nc_ic only: window in blocks (noisy context within a window)")


class TrainConfig(StageConfig):
    """Jacobi Forcing post-training of a causal LM on packed sequences, on a Ray TorchTrainer."""

    model: ModelLocation = Field(
        ..., description="model to start from: local dir, file:// or s3:// checkpoint, hub name"
    )
    data: Location = Field(..., description="URI of the packed dataset (schema jf_ray.packed)")
    out: Location = Field(..., description="URI of the run: checkpoints (HF format), metrics log, summary")
    run_name: str = Field("train", description="Ray Train run name under `out`; same name + out = resume")
    workers: int = Field(1, ge=1, description="data-parallel training workers")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs per worker (torch threads are set to this)")
    use_gpu: bool = Field(False, description="one GPU per worker (nccl); CPU workers use gloo")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="ddp, or fsdp (FSDP2) for models too big for one GPU")
    epochs: float = Field(1.0, gt=0.0, description="passes over the packed data (ignored when steps is set)")
    steps: int | None = Field(None, ge=1, description="optimizer steps to run (overrides epochs)")
    micro_batch_size: int = Field(1, ge=1, description="packed sequences per micro-batch per worker")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_row_tokens: int | None = Field(
        None,
        ge=8,
        description="pack several sequences into rows of this many tokens (None: one per row, padded)",
    )
    lr: float = Field(1e-5, gt=0.0, description="peak learning rate (paper 1e-6, n32 script 1e-5)")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="share of steps in linear warm-up")
    max_grad_norm: float = Field(1.0, gt=0.0, description="gradient clipping norm")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 autocast or fp32; auto: bf16 on GPU, fp32 on CPU (docs/precision.md)"
    )
    attn_implementation: Literal["sdpa", "eager", "flex_attention"] = Field(
        "sdpa", description="attention kernel; sdpa/eager take a 4D float mask, flex_attention a block mask"
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")
    loss: LossConfig = Field(default_factory=LossConfig, description="objective")
    mask: MaskConfig = Field(default_factory=MaskConfig, description="attention mask over packed sequences")
    anchor: Location | None = Field(
        None, description="JSONL URI of anchor sequences ({text} or {prompt, answer}) trained with AR loss"
    )
    anchor_ratio: float = Field(0.0, ge=0.0, description="anchor sequences per packed sequence in each micro-batch")
    anchor_max_tokens: int = Field(512, ge=2, description="anchor sequences are cut to this many tokens")
    shuffle: bool = Field(True, description="shuffle the packed data every epoch (seeded)")
    seed: int = Field(0, description="seed of shuffling and initialisation")
    log_every: int = Field(1, ge=1, description="log metrics (log file, logger) every this many steps")
    report_every: int = Field(
        25,
        ge=1,
        description="report metrics to Ray Train every this many steps (each report syncs all workers)",
    )
    checkpoint_every: int = Field(0, ge=0, description="checkpoint every this many steps (0 = only at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="how many recent checkpoints to keep")
    max_failures: int = Field(
        2,
        ge=0,
        description="worker failures (a lost node, a killed process) the run survives: Ray Train restarts every "
        "worker from the last checkpoint, and the run continues bit for bit as it would have; a deterministic "
        "error fails the same way each time, so it costs this many more attempts",
    )

    @model_validator(mode="after")
    def _anchor_needs_source(self) -> TrainConfig:
        if self.anchor_ratio > 0 and not self.anchor:
            raise ValueError("anchor_ratio > 0 needs an anchor URI")
        return self
