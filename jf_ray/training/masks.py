"""Attention masks over packed Jacobi Forcing sequences (docs/method-notes.md §5).

A packed row holds one or more sequences ``prompt ++ (noisy_j ++ clean_j)_j`` plus padding. Every token
carries four labels (built by :mod:`jf_ray.training.batches`): its ``segment`` (prompt / noisy / clean /
pad), its ``block`` index (-1 for prompt and pad), the ``seq`` it belongs to within the row (-1 for pad) and
its position id. The masks are functions of these labels only, so the same rule serves padded rows, rows
holding several sequences, and the flex-attention fast path.

Visibility (query -> key), always causal in packed order and within one sequence:

* prompt query: earlier prompt keys.
* clean query ``c_j``: the prompt, clean blocks ``< j``, ``c_j`` up to itself (an ordinary causal LM over
  ``prompt ++ response``: the teacher and the AR path).
* noisy query ``n_j``: the prompt, ``n_j`` up to itself, and
    - ``nc`` (noise-conditioned, the main method): noisy blocks ``< j``;
    - ``clean_context`` (CLLM-style baseline): clean blocks ``< j``;
    - ``nc_ic`` (windowed ablation): clean blocks of earlier windows, noisy blocks of the same window.
* pad query: only itself (a fully masked row would put NaNs into sdpa).
"""

from __future__ import annotations

import torch

from jf_ray.training.config import MaskKind

MASK_KINDS: tuple[str, ...] = ("nc", "clean_context", "nc_ic")

# Segment labels of packed tokens.
PAD, PROMPT, NOISY, CLEAN = -1, 0, 1, 2


def allowed_keys(
    segment: torch.Tensor,
    block: torch.Tensor,
    seq: torch.Tensor,
    kind: MaskKind = "nc",
    window: int = 16,
) -> torch.Tensor:
    """Boolean ``(B, L, L)``: entry ``[b, q, k]`` is True when query ``q`` may attend to key ``k``.

    ``segment``, ``block`` and ``seq`` are ``(B, L)`` integer tensors of the labels above; ``window`` (in
    blocks) only matters for ``nc_ic``.
    """
    check_kind(kind)
    index = torch.arange(segment.shape[-1], device=segment.device)
    return visibility(
        (segment[:, :, None], segment[:, None, :]),
        (block[:, :, None], block[:, None, :]),
        (seq[:, :, None], seq[:, None, :]),
        (index[None, :, None], index[None, None, :]),
        kind,
        window,
    )


def visibility(segments, blocks, seqs, indices, kind: MaskKind, window: int):
    """The rule itself, on broadcastable (query, key) pairs of labels; shared by both mask builders."""
    q_seg, k_seg = segments
    q_blk, k_blk = blocks
    q_seq, k_seq = seqs
    q_idx, k_idx = indices
    earlier_clean = (k_seg == CLEAN) & (k_blk < q_blk)
    earlier_noisy = (k_seg == NOISY) & (k_blk < q_blk)
    if kind == "nc":
        noisy_context = earlier_noisy
    elif kind == "clean_context":
        noisy_context = earlier_clean
    else:
        same_window = (k_blk // window) == (q_blk // window)
        noisy_context = (earlier_clean & ~same_window) | (earlier_noisy & same_window)
    own_block = (q_seg == k_seg) & (q_blk == k_blk)  # a copy of a block sees itself causally
    visible = (k_seg == PROMPT) | own_block | ((q_seg == CLEAN) & earlier_clean) | ((q_seg == NOISY) & noisy_context)
    allowed = visible & (k_idx <= q_idx) & (q_seq == k_seq) & (q_seq >= 0)
    return allowed | ((q_seg == PAD) & (q_idx == k_idx))


def check_kind(kind: str) -> None:
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; choose one of {', '.join(MASK_KINDS)}")


def flex_block_mask(
    segment: torch.Tensor,
    block: torch.Tensor,
    seq: torch.Tensor,
    kind: MaskKind = "nc",
    window: int = 16,
):
    """The same rule as :func:`allowed_keys` as a flex-attention ``BlockMask`` (fast path on GPU).

    Pass it as ``attention_mask`` to a model loaded with ``attn_implementation="flex_attention"``; it never
    materialises the ``L x L`` matrix, and fully masked tiles are skipped by the kernel.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    check_kind(kind)

    def mask_mod(b, h, q, k):
        return visibility(
            (segment[b, q], segment[b, k]),
            (block[b, q], block[b, k]),
            (seq[b, q], seq[b, k]),
            (q, k),
            kind,
            window,
        )

    batch, length = segment.shape
    return create_block_mask(mask_mod, B=batch, H=None, Q_LEN=length, KV_LEN=length, device=str(segment.device))
