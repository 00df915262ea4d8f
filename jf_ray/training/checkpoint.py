"""Training checkpoints as Hugging Face directories plus the state needed to resume (no Ray here).

A checkpoint directory is a normal ``save_pretrained`` model (+ tokenizer when the model has one), so the
decoders, ``jf_ray.modeling.load_model`` and ``from_pretrained`` load it unchanged, plus:

* ``optimizer.safetensors``: AdamW moments keyed ``<parameter name>/<state name>`` (safetensors, never
  pickle: loading a checkpoint must not execute code from storage);
* ``trainer_state.json``: step, token count, optimizer param groups, scheduler state, config.

The full (unsharded) model and optimizer state dicts come from ``torch.distributed.checkpoint.state_dict``,
the same call for a plain module, DDP and FSDP2; under FSDP every rank must call :func:`save_checkpoint`
(the gather is collective) and only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from jf_ray.training.loop import LoopState

logger = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a DDP wrapper (FSDP2 does not wrap)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def save_checkpoint(
    directory: str | Path,
    model,
    tokenizer,
    optimizer,
    scheduler,
    state: LoopState,
    config: dict,
    is_writer: bool,
) -> None:
    """Write a resumable HF checkpoint into ``directory`` (only when ``is_writer``; all ranks must call)."""
    model_state = get_model_state_dict(model, options=_FULL)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if not is_writer:
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    unwrap(model).save_pretrained(directory, state_dict=model_state)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    tensors = {
        f"{name}/{key}": value.detach().contiguous()
        for name, entries in optimizer_state["state"].items()
        for key, value in entries.items()
    }
    save_file(tensors, str(directory / OPTIMIZER_FILE))
    trainer_state = {
        "step": state.step,
        "tokens": state.tokens,
        "param_groups": optimizer_state["param_groups"],
        "scheduler": scheduler.state_dict(),
        "config": config,
    }
    (directory / STATE_FILE).write_text(json.dumps(trainer_state, indent=2, default=_jsonable))


def load_training_state(directory: str | Path, model, optimizer, scheduler) -> LoopState:
    """Restore optimizer and scheduler from a checkpoint (the weights were loaded with the model)."""
    directory = Path(directory)
    trainer_state = json.loads((directory / STATE_FILE).read_text())
    entries: dict[str, dict[str, torch.Tensor]] = {}
    for flat_name, value in load_file(str(directory / OPTIMIZER_FILE)).items():
        name, key = flat_name.rsplit("/", 1)
        entries.setdefault(name, {})[key] = value
    optimizer_state = {"state": entries, "param_groups": trainer_state["param_groups"]}
    set_optimizer_state_dict(model, optimizer, optim_state_dict=optimizer_state, options=_FULL)
    scheduler.load_state_dict(trainer_state["scheduler"])
    logger.info("resumed from %s at step %d", directory, trainer_state["step"])
    return LoopState(step=int(trainer_state["step"]), tokens=float(trainer_state["tokens"]))


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in {STATE_FILE}")
