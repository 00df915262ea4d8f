"""Tiny causal LMs built inside the tests (no downloads): random ones and one trained to repeat a cycle."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

_COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)


def random_qwen2(seed: int = 0, vocab_size: int = 200, init_std: float = 0.3, attn: str = "sdpa"):
    """A random Qwen2; a large init std makes its next-token distributions peaked (few near-ties)."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab_size, initializer_range=init_std, **_COMMON)
    config._attn_implementation = attn
    return Qwen2ForCausalLM(config).eval()


def random_llama(seed: int = 0, vocab_size: int = 200, init_std: float = 0.3):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, initializer_range=init_std, **_COMMON)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def save_vllm_llama(path, tokenizer, seed: int, max_positions: int = 1024):
    """A random tiny Llama saved with ``tokenizer`` at ``path``: head size 32, which vLLM's CPU attention
    accepts (the models above have 16); returns ``path``."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=128,
        max_position_embeddings=max_positions,
        initializer_range=0.3,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def cycle_qwen2(period: int = 12, vocab_size: int = 64, steps: int = 150, seed: int = 0):
    """A Qwen2 trained to continue ``0 1 2 ... period-1 0 1 ...``: its outputs repeat, so copying pays."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab_size, initializer_range=0.05, **_COMMON)
    model = Qwen2ForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, period, (16, 1))
        batch = (starts + torch.arange(48)[None]) % period
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()
