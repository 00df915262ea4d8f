"""Loading any Hugging Face causal LM and its tokenizer, and turning prompts into token ids.

Accepts a local checkpoint directory, a ``file://`` URI, an object-store URI (``s3://``; downloaded to a
local cache first), a hub name where the network allows it, a GGUF file (path or URI; converted once to a
cached checkpoint, jf_ray.gguf_checkpoint) or ``fetch://NAME``, a known model fetched once (jf_ray.model_fetch):
the loading code is the same. A training
checkpoint keeps its model files in a ``model/`` subdirectory beside the optimizer state
(docs/checkpoints.md); given the checkpoint root, the loaders use (and download) ``model/`` only.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from jf_ray.config import DTYPE_NAMES, DType
from jf_ray.errors import UserInputError

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODEL_SUBDIR = "model"  # the Hugging Face files of a training checkpoint (jf_ray.training.checkpoint)
CONFIG_FILE = "config.json"


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """The dtype to decode in: ``auto`` is bf16 on a GPU and fp32 on a CPU, where greedy decoding is exact;
    an explicit bf16 or fp16 on a CPU that emulates it is kept, with a warning (jf_ray.precision)."""
    from jf_ray.precision import resolve_precision

    if dtype not in _DTYPES and dtype != "auto":
        raise UserInputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_NAMES)}")
    return _DTYPES[resolve_precision(dtype, device, "decode").name]


# cuDNN's fused attention, torch's first choice for half precision on recent GPUs, builds an execution plan for
# every new query/key shape. Decoding meets a new key length at every forward, packed training a new row length
# at most steps: measured on an H100 in bf16, first passes ran 3-10x slower (decoding) and 6.6x slower (training
# steps, 473 vs 71 ms) than with the memory-efficient kernel, which takes the same 4D masks with no per-shape
# cost and was no slower once cuDNN's plans were built (training: 41.6 vs 46.9 ms per step).
_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_backends(device: torch.device | str):
    """Context for model forwards: on CUDA every SDPA kernel except cuDNN's; elsewhere torch's choice."""
    return sdpa_kernel(_ATTENTION_BACKENDS) if torch.device(device).type == "cuda" else nullcontext()


def grouped_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA attention, except that on CPU under a mask, grouped K/V heads (GQA) reach the kernel as
    they are (``enable_gqa``) instead of being repeated per query head first.

    transformers repeats them whenever a mask is given, because its GPU kernels fall back to the slow path
    with grouped heads and a mask. Decoding always passes a mask (ragged rows, drafts), and on CPU, whose flash
    kernel takes both, the repeat copied every layer's whole KV cache twice per forward: measured on the
    embedded model at 64 rows and ~240 cached tokens, 1.9 ms per copy, about half of each decoding step
    (docs/decoding.md). Same kernel and results, no copy.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    grouped = getattr(module, "num_key_value_groups", 1) > 1
    if not grouped or attention_mask is None or query.device.type != "cpu" or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


GROUPED_SDPA = "sdpa_grouped"  # what load_model asks transformers for when told "sdpa"


def register_grouped_sdpa() -> None:
    """Make ``GROUPED_SDPA`` a transformers attention implementation (masks built as for "sdpa")."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention)
    AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def local_model_path(model: str) -> str:
    """Map a model reference to something ``from_pretrained`` takes (a local dir or a hub name).

    Every loader of a model goes through here (serving, benchmarks, evaluation, collection, training, vLLM),
    so a ``.gguf`` file works wherever a checkpoint does: it becomes its converted checkpoint; and so does
    ``fetch://NAME``, a known model fetched once into a cache (jf_ray.model_fetch)."""
    from jf_ray.gguf_checkpoint import gguf_checkpoint, is_gguf_reference
    from jf_ray.model_fetch import fetched_checkpoint, is_fetch_reference

    if is_fetch_reference(model):
        return str(fetched_checkpoint(model))
    if is_gguf_reference(model):
        return str(gguf_checkpoint(model))
    if model.startswith("file://"):
        model = model[len("file://") :]
    if "://" in model:
        from jf_ray.storage import download_dir

        return str(download_dir(model_files_uri(model)))
    path = Path(model).expanduser()
    if path.exists():
        if not (path / CONFIG_FILE).is_file() and (path / MODEL_SUBDIR / CONFIG_FILE).is_file():
            path = path / MODEL_SUBDIR
        if not (path / CONFIG_FILE).is_file():
            raise UserInputError(f"model path {path} has no config.json (not a Hugging Face checkpoint)")
        return str(path)
    looks_like_hub_name = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if not looks_like_hub_name:
        raise UserInputError(f"model path not found: {model}")
    return model


def model_files_uri(uri: str) -> str:
    """``uri`` itself when it holds a model, its ``model/`` when it is a training checkpoint's root."""
    from jf_ray.storage import exists, join_uri

    if not exists(join_uri(uri, CONFIG_FILE)) and exists(join_uri(uri, MODEL_SUBDIR, CONFIG_FILE)):
        return join_uri(uri, MODEL_SUBDIR)
    return uri


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(local_model_path(model))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model: str, dtype: DType = "auto", device: str = "auto", attn_implementation: str = "sdpa"):
    """Load a causal LM for inference (eval mode, no grad bookkeeping) on ``device``."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    path = local_model_path(model)
    if attn_implementation == "sdpa":
        register_grouped_sdpa()
        attn_implementation = GROUPED_SDPA
    try:
        lm = AutoModelForCausalLM.from_pretrained(
            path, dtype=resolve_dtype(dtype, device), attn_implementation=attn_implementation
        )
    except OSError as exc:
        raise UserInputError(f"cannot load model {model!r}: {exc}") from None
    lm.to(device).eval()
    logger.info("loaded %s (%.1fM parameters, %s, %s)", model, num_parameters(lm) / 1e6, lm.dtype, device)
    return lm


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def eos_token_ids(model, tokenizer=None) -> list[int]:
    """All ids that end a response: the generation config's EOS list plus the tokenizer's EOS."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return sorted(ids)


def encode_prompt(tokenizer, prompt: str, use_chat_template: bool = True) -> list[int]:
    """Token ids of a user prompt; wrapped in the chat template when the tokenizer has one."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def encode_chat_examples(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """Token ids of chat turns ``prompt -> answer EOS``, each with the length of its prompt part.

    The prompt part equals what :func:`encode_prompt` gives at inference (the chat template rendered, then
    encoded), and the answer is encoded on its own, so training sees the token boundary the decoders see.
    Rendering and encoding are batched: per-example calls cost milliseconds each. Needs a fast tokenizer
    with a chat template (the embedded base's ends a reply with ``<|im_end|>``, its EOS).
    """
    if not pairs:
        return []
    conversations = [[{"role": "user", "content": prompt}] for prompt, _ in pairs]
    rendered = tokenizer.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)
    backend = tokenizer.backend_tokenizer
    prompt_ids = [e.ids for e in backend.encode_batch(rendered, add_special_tokens=False)]
    answer_ids = [e.ids for e in backend.encode_batch([answer for _, answer in pairs], add_special_tokens=False)]
    eos = tokenizer.eos_token_id
    return [(p + a + [eos], len(p)) for p, a in zip(prompt_ids, answer_ids)]


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(B, 1, L, L)`` float attention mask from a boolean ``(B, L, L)``: 0 where allowed, ``finfo(dtype).min``
    elsewhere.

    transformers passes a 4D mask through unchanged; an additive float mask is right for both the eager and
    the sdpa attention implementations (a bool mask is right for sdpa only).
    """
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def set_torch_threads(num_threads: int | None) -> None:
    """Pin intra-op threads; two torch processes each using every core slow down ~10x on small machines."""
    if num_threads is None:
        num_threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or None
    if num_threads:
        torch.set_num_threads(max(1, num_threads))
