"""Losses and their targets (docs/method-notes.md §6; §10 item 6)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jf_ray.training.batches import IGNORE, TrainSequence, collate
from jf_ray.training.losses import consistency_kl, consistency_loss, jacobi_forcing_loss, next_token_loss
from jf_ray.training.masks import NOISY

PROMPT = [1, 2, 3]
CLEAN = [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19]]
NOISY_BLOCKS = [[10, 11, 40, 41], [14, 42, 43, 44], [18, 19]]  # diverge at 2, 1, never


def batch(ar_on_prompt=False, positions="from_divergence", noisy=NOISY_BLOCKS, **kwargs):
    return collate(
        [TrainSequence(PROMPT, noisy, CLEAN)],
        ar_on_prompt=ar_on_prompt,
        consistency_positions=positions,
        **kwargs,
    )


def test_ar_targets_are_the_next_tokens_of_prompt_plus_clean_response():
    response = [t for block in CLEAN for t in block]
    for ar_on_prompt in (False, True):
        b = batch(ar_on_prompt)
        labels, ids, segment = b.ar_labels[0], b.input_ids[0], b.segment[0]
        stream = [i for i in range(len(ids)) if segment[i] != NOISY]
        expected = {src: int(ids[dst]) for src, dst in zip(stream[:-1], stream[1:])}
        if not ar_on_prompt:
            expected = {src: tok for src, tok in expected.items() if src >= len(PROMPT) - 1}
        got = {i: int(v) for i, v in enumerate(labels) if v != IGNORE}
        assert got == expected
        assert [got[i] for i in sorted(got)][-len(response) :] == response  # bridge P-1 -> c_0[0] included
        assert (labels[segment == NOISY] == IGNORE).all(), "noisy positions get no AR loss"


def test_consistency_pairs_start_at_the_first_divergence():
    b = batch()
    ids = b.input_ids.reshape(-1)
    pairs = list(zip(b.student_index.tolist(), b.teacher_index.tolist()))
    assert len(pairs) == (4 - 2) + (4 - 1) + 0
    assert all(b.segment.reshape(-1)[s] == NOISY for s, _ in pairs)
    first_student, first_teacher = pairs[0]
    assert int(ids[first_student]) == 40 and int(ids[first_teacher]) == 12  # same offset, noisy vs clean
    assert len(batch(positions="all").student_index) == 10


def test_consistency_loss_is_zero_when_noisy_equals_clean():
    torch.manual_seed(0)
    for positions in ("from_divergence", "all"):
        b = batch(positions=positions, noisy=CLEAN)
        logits = torch.randn(*b.input_ids.shape, 50)
        # identical streams under the NC mask give identical logits at both copies of a block
        logits.view(-1, 50)[b.student_index] = logits.view(-1, 50)[b.teacher_index]
        for reduction in ("token", "block"):
            assert float(consistency_loss(logits, b, reduction=reduction)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("reduction", ["token", "block"])
def test_consistency_gradient_reaches_only_noisy_positions(reduction):
    torch.manual_seed(1)
    b = batch(positions="all")
    logits = torch.randn(*b.input_ids.shape, 50, requires_grad=True)
    loss = consistency_loss(logits, b, temperature=2.0, reduction=reduction)
    assert float(loss.detach()) > 0
    loss.backward()
    touched = logits.grad.abs().sum(-1).reshape(-1) > 0
    assert touched.nonzero().flatten().tolist() == sorted(b.student_index.tolist())


def test_kl_form_equals_soft_cross_entropy_minus_teacher_entropy():
    torch.manual_seed(2)
    flat = torch.randn(12, 30)
    student, teacher = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7])
    kl = consistency_kl(flat, student, teacher)
    p = F.softmax(flat[teacher], -1)
    soft_ce = -(p * F.log_softmax(flat[student], -1)).sum(-1)
    entropy = -(p * F.log_softmax(flat[teacher], -1)).sum(-1)
    torch.testing.assert_close(kl, soft_ce - entropy)
    reference = F.kl_div(F.log_softmax(flat[student], -1), p, reduction="none").sum(-1)
    torch.testing.assert_close(kl, reference)


def test_block_reduction_is_the_paper_average_of_per_block_sums():
    torch.manual_seed(3)
    b = batch()
    logits = torch.randn(*b.input_ids.shape, 50)
    kl = consistency_kl(logits.view(-1, 50), b.student_index, b.teacher_index)
    per_block = [kl[b.pair_block == blk].sum() for blk in b.pair_block.unique()]
    expected = torch.stack(per_block).mean()
    torch.testing.assert_close(consistency_loss(logits, b, reduction="block"), expected)
    torch.testing.assert_close(consistency_loss(logits, b, reduction="token"), kl.mean())


def test_total_combines_the_parts_with_their_weights():
    torch.manual_seed(4)
    anchor = TrainSequence([5, 6, 7, 8, 9], is_anchor=True, anchor_loss_from=2)
    b = collate([TrainSequence(PROMPT, NOISY_BLOCKS, CLEAN), anchor])
    assert (b.anchor_labels[1] != IGNORE).sum() == 3  # targets 7, 8, 9
    assert (b.ar_labels[1] == IGNORE).all() and (b.anchor_labels[0] == IGNORE).all()
    logits = torch.randn(*b.input_ids.shape, 50)
    parts = jacobi_forcing_loss(logits, b, ar_weight=10.0, anchor_weight=0.5)
    ar, _ = next_token_loss(logits, b.ar_labels)
    anchor_loss, _ = next_token_loss(logits, b.anchor_labels)
    torch.testing.assert_close(parts.total, parts.consistency + 10.0 * ar + 0.5 * anchor_loss)
    assert parts.ar_targets == 10 and parts.anchor_targets == 3
    weighted = jacobi_forcing_loss(logits, b, ar_weight=1.0, anchor_weight=1.0, consistency_weight=0.0)
    torch.testing.assert_close(weighted.total, ar + anchor_loss)
