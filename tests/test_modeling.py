"""Loading models and the forward settings shared by decoding and training (``jf_ray.modeling``)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import random_qwen2

from jf_ray.errors import UserInputError
from jf_ray.modeling import attention_backends, load_model, local_model_path, resolve_dtype


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
