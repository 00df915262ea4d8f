"""Random-init Qwen2 model and its pretraining loop (plain torch, seeded, with a tqdm progress bar)."""

from __future__ import annotations

import logging
import math
import random
import sys
import time

import torch

from jf_ray.basemodel.corpus import TokenRows
from jf_ray.basemodel.presets import BasePreset
from jf_ray.modeling import additive_mask

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def model_config(preset: BasePreset, vocab_size: int, **special_ids):
    """The Qwen2 architecture of ``preset`` (tied embeddings) with ``special_ids`` (eos/pad/bos token ids)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=preset.hidden_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_kv_heads,
        intermediate_size=preset.intermediate_size,
        max_position_embeddings=preset.max_position_embeddings,
        rope_theta=preset.rope_theta,
        tie_word_embeddings=True,
        **special_ids,
    )


def new_model(preset: BasePreset, tokenizer):
    """A randomly initialised Qwen2 causal LM with the tokenizer's special ids in its config."""
    from transformers import GenerationConfig, Qwen2ForCausalLM

    eos_id = tokenizer.eos_token_id
    ids = {"bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": tokenizer.pad_token_id}
    model = Qwen2ForCausalLM(model_config(preset, len(tokenizer), **ids))
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id)
    return model


def lr_at(step: int, preset: BasePreset) -> float:
    """Linear warm-up to ``lr``, then cosine decay to a tenth of it."""
    if step < preset.warmup_steps:
        return preset.lr * (step + 1) / preset.warmup_steps
    progress = (step - preset.warmup_steps) / max(1, preset.steps - preset.warmup_steps)
    return preset.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def batch_order(num_rows: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """Row indices for every step: seeded epochs, each a fresh permutation of all rows."""
    generator = torch.Generator().manual_seed(seed)
    needed = steps * batch_size
    epochs = [torch.randperm(num_rows, generator=generator) for _ in range(-(-needed // num_rows))]
    return torch.cat(epochs)[:needed].view(steps, batch_size)


def pretrain(model, rows: TokenRows, preset: BasePreset, seed: int, show_progress: bool = True) -> dict:
    """Train ``model`` in place on ``rows`` for ``preset.steps`` steps; returns loss and throughput figures."""
    from tqdm import tqdm

    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": preset.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=preset.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    order = batch_order(len(rows), preset.steps, preset.batch_size, seed)
    losses: list[float] = []
    start = time.perf_counter()
    # A bar on a terminal; elsewhere (a Ray task's forwarded log, a file) one log line per 5% of the steps.
    on_terminal = sys.stderr.isatty()
    bar = tqdm(range(preset.steps), desc="pretrain", disable=not (show_progress and on_terminal), mininterval=1.0)
    log_every = max(1, preset.steps // 20) if show_progress and not on_terminal else 0
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, preset)
        loss = _train_step(model, optimizer, rows, order[step], preset.precision == "bf16")
        losses.append(loss)
        tokens_per_s = (step + 1) * preset.batch_size * preset.seq_len / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
        if log_every and ((step + 1) % log_every == 0 or step + 1 == preset.steps):
            left_s = (preset.steps - step - 1) * preset.batch_size * preset.seq_len / tokens_per_s
            logger.info(
                "pretrain step %d/%d loss %.3f, %.0f tokens/s (%s), %s left",
                step + 1,
                preset.steps,
                loss,
                tokens_per_s,
                preset.precision,
                tqdm.format_interval(left_s),
            )
    model.eval()
    wall_s = time.perf_counter() - start
    tail = losses[-max(1, len(losses) // 20) :]
    summary = {
        "steps": preset.steps,
        "train_tokens": preset.steps * preset.batch_size * preset.seq_len,
        "final_loss": round(sum(tail) / len(tail), 4),
        "train_wall_s": round(wall_s, 1),
        "tokens_per_s": round(preset.steps * preset.batch_size * preset.seq_len / wall_s, 1),
    }
    logger.info("pretrain done: %s", summary)
    return summary


def time_train_steps(preset: BasePreset, steps: int = 3, threads: int | None = None) -> float:
    """Seconds per training step of ``preset``'s model on this machine, at its (resolved) precision.

    Random weights and tokens, one packed row shape as in training; the first step (allocation, kernel
    choice) is not counted. About 0.47 s for the ``small`` preset in fp32 on 2 cores: what the job's first
    ETA rests on, instead of a throughput taken from another machine."""
    from transformers import Qwen2ForCausalLM

    from jf_ray.basemodel.corpus import TokenRows

    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads or threads_before)
    try:
        model = Qwen2ForCausalLM(model_config(preset, preset.vocab_size)).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        shape = (preset.batch_size, preset.seq_len)
        tokens = torch.randint(0, preset.vocab_size, shape)
        positions = (torch.arange(preset.seq_len) % (preset.seq_len // 2)).expand(shape).contiguous()
        rows = TokenRows(tokens, tokens.clone(), positions)
        index = torch.arange(preset.batch_size)
        times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            _train_step(model, optimizer, rows, index, preset.precision == "bf16")
            times.append(time.perf_counter() - start)
        return min(times[1:])  # the fastest: the job starts Ray beside the probe, whose start-up steals cycles
    finally:
        torch.set_num_threads(threads_before)


def sequence_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive [B, 1, L, L] mask: causal, and a token sees only its own sequence of the packed row."""
    sequence = torch.cumsum(position_ids == 0, dim=1)
    same = sequence[:, :, None] == sequence[:, None, :]
    length = position_ids.shape[1]
    return additive_mask(same & torch.ones(length, length, dtype=torch.bool).tril(), dtype)


def _train_step(model, optimizer, rows: TokenRows, index: torch.Tensor, bf16: bool = False) -> float:
    input_ids, labels, positions = rows.input_ids[index], rows.labels[index], rows.position_ids[index]
    dtype = torch.bfloat16 if bf16 else torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(
            input_ids=input_ids,
            labels=labels,
            position_ids=positions,
            attention_mask=sequence_mask(positions, dtype),
        ).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())
