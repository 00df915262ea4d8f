"""Loading models and the forward settings shared by decoding and training (``jf_ray.modeling``)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import random_qwen2

from jf_ray.errors import UserInputError
from jf_ray.modeling import GROUPED_SDPA, attention_backends, load_model, local_model_path, resolve_dtype


def test_forwards_on_cuda_leave_out_cudnn_attention():
    """cuDNN attention builds a plan per new key length (every decoding forward has one): see modeling."""
    cudnn_before = torch.backends.cuda.cudnn_sdp_enabled()
    with attention_backends(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == cudnn_before
    with attention_backends(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled() == cudnn_before


def test_dtypes_resolve_by_device_and_unknown_ones_are_named():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda:1") == torch.bfloat16
    assert resolve_dtype("fp16", "cpu") == torch.float16
    with pytest.raises(UserInputError, match="'int8'"):
        resolve_dtype("int8", "cpu")


def test_model_references_resolve_to_checkpoints_or_clear_errors(tmp_path):
    checkpoint, reference = tmp_path / "ckpt", random_qwen2(seed=3)
    reference.save_pretrained(checkpoint)
    assert local_model_path(f"file://{checkpoint}") == str(checkpoint)
    assert local_model_path("Qwen/Qwen2.5-Coder-7B-Instruct") == "Qwen/Qwen2.5-Coder-7B-Instruct"  # a hub name
    with pytest.raises(UserInputError, match="no config.json"):
        local_model_path(str(tmp_path))
    with pytest.raises(UserInputError, match="not found"):
        local_model_path(str(tmp_path / "missing"))
    loaded = load_model(str(checkpoint), dtype="fp32", device="cpu")
    assert not loaded.training and loaded.dtype == torch.float32
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits)


def test_loaded_models_pass_grouped_heads_to_sdpa_with_the_same_results(tmp_path):
    """load_model's "sdpa" hands grouped K/V heads to the kernel unrepeated under a mask (see modeling): the
    logits of a ragged, masked forward and the greedy decode match transformers' own sdpa."""
    from transformers import DynamicCache

    from jf_ray.decoding.engine import generate
    from jf_ray.decoding.query import Segment, build_query
    from jf_ray.decoding.types import DecodeConfig

    reference = random_qwen2(seed=5)
    reference.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype="fp32", device="cpu")
    assert loaded.config._attn_implementation == GROUPED_SDPA
    assert loaded.config.num_key_value_heads < loaded.config.num_attention_heads  # the grouped path is exercised
    valid = torch.tensor([[True] * 6, [True, False, True, True, False, False]])  # ragged rows, holes
    keys = torch.randn(2, 2, 6, loaded.config.hidden_size // loaded.config.num_attention_heads)
    query = build_query([[Segment([5, 6, 7], 6)], [Segment([8], 3)]], valid, torch.float32)
    outs = []
    for model in (loaded, reference):
        cache = DynamicCache()
        for layer in range(model.config.num_hidden_layers):
            cache.update(keys, keys.flip(2), layer)
        with torch.no_grad():
            inputs = dict(
                input_ids=query.input_ids, position_ids=query.position_ids, attention_mask=query.attention_mask
            )
            outs.append(model(**inputs, past_key_values=cache).logits)
    torch.testing.assert_close(outs[0], outs[1])
    prompts = [[1, 2, 3, 4], [9, 8, 7, 6, 5, 4, 3]]
    greedy = DecodeConfig(decoder="ar", max_new_tokens=24)
    ar = [r.token_ids for r in generate(reference, prompts, greedy, [0], batch_size=2)]
    for decoder in ("ar", "jacobi", "rolling"):
        config = greedy.model_copy(update={"decoder": decoder, "block_size": 8})
        assert [r.token_ids for r in generate(loaded, prompts, config, [0], batch_size=2)] == ar
