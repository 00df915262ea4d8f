"""The plain torch training step and loop of Jacobi Forcing (no Ray here).

One optimizer step = ``grad_accum`` micro-batches, each one forward of the packed rows under the
noise-aware mask, the losses of :mod:`jf_ray.training.losses`, and one backward scaled by
``1 / grad_accum``; then gradient clipping, AdamW and the cosine schedule. Gradient synchronisation across
data-parallel workers (DDP ``no_sync`` / FSDP2 ``set_requires_gradient_sync``) happens on the last
micro-batch only. :mod:`jf_ray.training.ray_train` wraps :func:`run_loop` with Ray Train reporting and
checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from jf_ray.modeling import additive_mask, attention_backends
from jf_ray.training.batches import PackedBatch
from jf_ray.training.config import TrainConfig
from jf_ray.training.losses import jacobi_forcing_loss
from jf_ray.training.masks import allowed_keys, flex_block_mask

logger = logging.getLogger(__name__)


def packed_forward(model, batch: PackedBatch, kind: str = "nc", window: int = 16, attn: str = "sdpa"):
    """Logits ``(B, L, V)`` of one forward over packed rows with explicit positions and the 4D mask."""
    if attn == "flex_attention":
        attention_mask = flex_block_mask(batch.segment, batch.block, batch.seq, kind, window)
    else:
        device_type = batch.input_ids.device.type
        # Under autocast the attention runs in the autocast dtype; the mask must match it.
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        else:
            dtype = next(model.parameters()).dtype
        attention_mask = additive_mask(allowed_keys(batch.segment, batch.block, batch.seq, kind, window), dtype)
    with attention_backends(batch.input_ids.device):  # no cuDNN attention on CUDA: see modeling
        output = model(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            attention_mask=attention_mask,
            use_cache=False,
        )
    return output.logits


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    """Linear warm-up to the peak learning rate, then cosine decay to 0 at ``total_steps``."""
    from transformers import get_cosine_schedule_with_warmup

    warmup = math.ceil(total_steps * warmup_ratio)
    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool):
    """Skip the gradient all-reduce on accumulation micro-batches (DDP and FSDP2 spell it differently)."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def autocast_context(device: torch.device | str, precision: str):
    """bf16 autocast where ``precision`` resolves to bf16 on ``device`` (jf_ray.precision), else nothing."""
    from jf_ray.precision import resolve_precision

    device = torch.device(device)
    if resolve_precision(precision, str(device), "train").name == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model, micro_batches: list[PackedBatch], optimizer, scheduler, config: TrainConfig, device) -> dict:
    """One optimizer step over ``micro_batches``; returns the step's metrics (means over micro-batches)."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    tokens = pairs = 0
    for index, micro in enumerate(micro_batches):
        micro = micro.to(device)
        with gradient_sync(model, enabled=index == len(micro_batches) - 1):
            with autocast_context(device, config.precision):
                logits = packed_forward(model, micro, config.mask.kind, config.mask.window, config.attn_implementation)
            parts = jacobi_forcing_loss(
                logits,
                micro,
                ar_weight=config.loss.ar_weight,
                anchor_weight=config.loss.anchor_weight,
                temperature=config.loss.temperature,
                reduction=config.loss.reduction,
                consistency_weight=config.loss.consistency_weight,
            )
            (parts.total / len(micro_batches)).backward()
        for name, value in parts.to_metrics().items():
            sums[name] = sums.get(name, 0.0) + value / len(micro_batches)
        tokens += micro.num_tokens
        pairs += parts.consistency_pairs
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    return {**sums, "grad_norm": float(grad_norm), "lr": lr, "tokens": tokens, "consistency_pairs": pairs}


SUMMED = ("tokens", "consistency_pairs")
AVERAGED = ("loss", "loss_consistency", "loss_ar", "loss_anchor")


def reduce_across_workers(metrics: dict, device) -> dict:
    """Token counts summed and losses averaged over data-parallel workers (unchanged when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return metrics
    names = SUMMED + AVERAGED
    tensor = torch.tensor([float(metrics[name]) for name in names], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    world = dist.get_world_size()
    reduced = dict(metrics)
    for name, value in zip(names, tensor.tolist()):
        reduced[name] = value if name in SUMMED else value / world
    return reduced


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    tokens: float = 0.0  # packed tokens processed by all workers


StepBatches = Callable[[int], list[PackedBatch]]  # step index -> its micro-batches (deterministic)
OnStep = Callable[[LoopState, dict], None]


def run_loop(
    model,
    batches_for_step: StepBatches,
    optimizer,
    scheduler,
    config: TrainConfig,
    total_steps: int,
    state: LoopState,
    device,
    on_step: OnStep,
) -> LoopState:
    """Train from ``state.step`` to ``total_steps``; ``on_step`` gets every step's metrics (it logs,
    reports and checkpoints). Tokens/s counts packed tokens of all workers over the wall time since the
    previous step ended, so that reporting and checkpointing costs show in it."""
    mark = time.perf_counter()
    while state.step < total_steps:
        metrics = train_step(model, batches_for_step(state.step), optimizer, scheduler, config, device)
        metrics = reduce_across_workers(metrics, device)
        now = time.perf_counter()
        elapsed, mark = now - mark, now
        state.step += 1
        state.tokens += metrics["tokens"]
        metrics.update(
            step=state.step,
            tokens_total=state.tokens,
            step_s=elapsed,
            tokens_per_s=metrics["tokens"] / elapsed if elapsed > 0 else 0.0,
        )
        on_step(state, metrics)
    return state
