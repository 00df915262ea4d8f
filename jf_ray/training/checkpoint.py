"""Training checkpoints: the model's Hugging Face files apart from the state needed to resume (no Ray here).

Layout of one checkpoint directory (docs/checkpoints.md)::

    model/      save_pretrained weights in the model's own dtype (its config's ``dtype``) + config,
                generation config and tokenizer: what decoders, ``jf_ray.modeling.load_model``,
                ``from_pretrained`` and vLLM load, and all that collection, evaluation and serving fetch
    trainer/    optimizer.safetensors  AdamW moments keyed ``<parameter name>/<state name>``
                master.safetensors     the fp32 master weights, only when the model's dtype is narrower
                trainer_state.json     step, token count, optimizer param groups, scheduler state, config

Tensors are safetensors, never pickle: loading a checkpoint must not execute code from storage. The full
(unsharded) model and optimizer state dicts come from ``torch.distributed.checkpoint.state_dict``, the same
call for a plain module, DDP and FSDP2; under FSDP every rank must call :func:`save_checkpoint` (the gather
is collective) and only rank 0 writes.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from jf_ray.modeling import MODEL_SUBDIR
from jf_ray.training.loop import LoopState

logger = logging.getLogger(__name__)

MODEL_DIR = MODEL_SUBDIR
TRAINER_DIR = "trainer"
OPTIMIZER_FILE = "optimizer.safetensors"
MASTER_FILE = "master.safetensors"
STATE_FILE = "trainer_state.json"
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a DDP wrapper (FSDP2 does not wrap)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def declared_dtype(model_dir: str | Path) -> torch.dtype:
    """The dtype a model directory's config declares for its weights (float32 when it names none)."""
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(model_dir), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def save_checkpoint(
    directory: str | Path,
    model,
    tokenizer,
    optimizer,
    scheduler,
    state: LoopState,
    config: dict,
    is_writer: bool,
    model_dtype: torch.dtype | None = None,
) -> None:
    """Write ``model/`` and ``trainer/`` into ``directory`` (only when ``is_writer``; all ranks must call).

    ``model_dtype``: the dtype of the saved model files (default: that of the trained parameters)."""
    model_state = get_model_state_dict(model, options=_FULL)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=_FULL)
    if not is_writer:
        return
    directory = Path(directory)
    model_dtype = model_dtype or next(t.dtype for t in model_state.values() if t.is_floating_point())
    save_model_files(directory / MODEL_DIR, unwrap(model), tokenizer, model_state, model_dtype)
    trainer_dir = directory / TRAINER_DIR
    trainer_dir.mkdir(parents=True, exist_ok=True)
    if any(t.is_floating_point() and t.dtype != model_dtype for t in model_state.values()):
        save_file(_unshared(model_state), str(trainer_dir / MASTER_FILE))
    moments = {
        f"{name}/{key}": value for name, entries in optimizer_state["state"].items() for key, value in entries.items()
    }
    save_file(_unshared(moments), str(trainer_dir / OPTIMIZER_FILE))
    trainer_state = {
        "step": state.step,
        "tokens": state.tokens,
        "param_groups": optimizer_state["param_groups"],
        "scheduler": scheduler.state_dict(),
        "config": config,
    }
    (trainer_dir / STATE_FILE).write_text(json.dumps(trainer_state, indent=2, default=_jsonable))


def save_model_files(directory: Path, model, tokenizer, state_dict: dict, dtype: torch.dtype) -> None:
    """A plain Hugging Face model directory with the weights cast to ``dtype`` (nothing else in it)."""
    model.save_pretrained(directory, state_dict=_cast(state_dict, dtype))
    # save_pretrained writes the dtype of the module's parameters (the fp32 master copy) into config.json;
    # the file must name the dtype the weights are stored in.
    config = copy.deepcopy(model.config)
    config.dtype = dtype
    config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def load_training_state(directory: str | Path, model, optimizer, scheduler) -> LoopState:
    """Restore master weights (when stored apart), optimizer and scheduler from a checkpoint; the model was
    loaded from its ``model/``."""
    trainer_dir = Path(directory) / TRAINER_DIR
    trainer_state = json.loads((trainer_dir / STATE_FILE).read_text())
    if (trainer_dir / MASTER_FILE).is_file():
        set_model_state_dict(model, load_file(str(trainer_dir / MASTER_FILE)), options=_FULL)
    entries: dict[str, dict[str, torch.Tensor]] = {}
    for flat_name, value in load_file(str(trainer_dir / OPTIMIZER_FILE)).items():
        name, key = flat_name.rsplit("/", 1)
        entries.setdefault(name, {})[key] = value
    optimizer_state = {"state": entries, "param_groups": trainer_state["param_groups"]}
    set_optimizer_state_dict(model, optimizer, optim_state_dict=optimizer_state, options=_FULL)
    scheduler.load_state_dict(trainer_state["scheduler"])
    logger.info("resumed from %s at step %d", directory, trainer_state["step"])
    return LoopState(step=int(trainer_state["step"]), tokens=float(trainer_state["tokens"]))


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors cast to ``dtype``; tensors that shared memory (tied embeddings) still share it, so
    save_pretrained stores them once."""
    cast: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            out[name] = tensor
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        out[name] = cast.setdefault(key, tensor.to(dtype))
    return out


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): copy the second and later of each."""
    seen: set[int] = set()
    out = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if storage in seen else tensor
        seen.add(storage)
    return out


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in {STATE_FILE}")
