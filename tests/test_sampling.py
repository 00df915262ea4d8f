"""Sampled (non-greedy) Jacobi decoding must keep the model's sampling distribution exactly.

Vocabulary of 8 tokens, so the exact distribution of each of the first generated tokens can be enumerated
and compared with thousands of samples by a chi-square test (Wilson-Hilferty critical value, alpha 1e-3).
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import random_qwen2

from jf_ray.decoding import DecodeConfig, DecodingEngine
from jf_ray.decoding.acceptance import filter_probs, speculative_verify_tree
from jf_ray.decoding.planner import CostCurve

VOCAB, PROMPT, SAMPLES, DEPTH = 8, [3, 1, 4], 2000, 4


@pytest.fixture(scope="module")
def model():
    return random_qwen2(seed=5, vocab_size=VOCAB, init_std=0.15)


def exact_marginals(model, temperature, top_k, top_p) -> list[torch.Tensor]:
    """P(token at step t = v) for t < DEPTH, by enumerating every prefix of generated tokens."""
    marginals, prefixes, weights = [], [()], torch.ones(1)
    for _ in range(DEPTH):
        ids = torch.tensor([PROMPT + list(p) for p in prefixes])
        with torch.no_grad():
            logits = model(ids).logits[:, -1]
        probs = filter_probs(logits, temperature, top_k, top_p)
        joint = weights[:, None] * probs  # [prefixes, V]
        marginals.append(joint.sum(0))
        prefixes = [p + (v,) for p in prefixes for v in range(VOCAB)]
        weights = joint.reshape(-1)
    return marginals


def chi_square_ok(counts: torch.Tensor, expected_probs: torch.Tensor) -> bool:
    keep = expected_probs * counts.sum() >= 5  # pool rare cells so the test is valid
    observed = torch.cat([counts[keep], counts[~keep].sum().view(1)])
    expected = torch.cat([expected_probs[keep], expected_probs[~keep].sum().view(1)]) * counts.sum()
    observed, expected = observed[expected > 0], expected[expected > 0]
    statistic = float(((observed - expected) ** 2 / expected).sum())
    df = len(observed) - 1
    z = 3.09  # one-sided alpha = 1e-3
    critical = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return statistic < critical


@pytest.mark.parametrize(
    "decoder,temperature,top_k,top_p",
    [
        ("ar", 1.0, 0, 1.0),
        ("jacobi", 1.0, 0, 1.0),
        ("rolling", 1.0, 0, 1.0),
        ("mr", 1.0, 0, 1.0),  # the alias of multiblock
        ("lookup", 1.0, 0, 1.0),
        ("auto", 1.0, 0, 1.0),
        ("jacobi", 0.7, 5, 0.9),
        ("rolling", 0.7, 5, 0.9),
        ("multiblock", 0.7, 5, 0.9),
        ("auto", 0.7, 5, 0.9),
    ],
)
def test_sampling_matches_the_model_distribution(model, decoder, temperature, top_k, top_p):
    # auto: a curve under which the draft length changes with the rows still running (4 when few, 1 when many)
    curve = CostCurve([1, 256, 2048], [1, 4], [[1e3, 1e3], [1e3, 2e3], [8e3, 16e3]])  # ms: the engine's own is nothing
    counts, _ = sample_counts(model, decoder, temperature, top_k, top_p, curve)
    expected = exact_marginals(model, temperature, top_k, top_p)
    for t in range(DEPTH):
        assert chi_square_ok(counts[t], expected[t]), (t, counts[t], expected[t] * SAMPLES)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 0.9)])
def test_auto_with_recycled_candidates_keeps_the_distribution(model, temperature, top_k, top_p):
    """Width is free: auto verifies every candidate on offer beside its draft, in one exact walk (several at a
    node: the test below)."""
    free = CostCurve([1, 256, 2048], [1, 64], [[1000.0, 1000.0]] * 3)  # the engine's own time is nothing beside it
    counts, stats = sample_counts(model, "auto", temperature, top_k, top_p, free)
    assert sum(n for s in stats for k, n in s.candidates_hist.items() if k > 0) > SAMPLES // 8
    expected = exact_marginals(model, temperature, top_k, top_p)
    for t in range(DEPTH):
        assert chi_square_ok(counts[t], expected[t]), (t, counts[t], expected[t] * SAMPLES)


def sample_counts(model, decoder, temperature, top_k, top_p, curve) -> tuple[torch.Tensor, list]:
    """Counts of each token at each of the first DEPTH steps over SAMPLES seeds, and every request's stats."""
    counts, stats = torch.zeros(DEPTH, VOCAB), []
    engine = DecodingEngine(model, [], max_batch_size=256, cost_curve=curve)  # one request per seed, batched
    for seed in range(SAMPLES):
        config = DecodeConfig(
            decoder=decoder,
            block_size=4,
            max_new_tokens=DEPTH,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
        )
        engine.add(str(seed), PROMPT, config)
    while engine.has_work:
        for out in engine.step():
            if out.result is not None:
                stats.append(out.result.stats)
                for t, token in enumerate(out.result.token_ids):
                    counts[t, token] += 1
    return counts, stats


def test_chi_square_detects_a_wrong_distribution(model):
    """The check above can fail: sampling at the wrong temperature (0.8 instead of 1) is caught."""
    expected = exact_marginals(model, 1.0, 0, 1.0)[1]
    wrong = exact_marginals(model, 0.8, 0, 1.0)[1]
    assert not chi_square_ok(wrong * SAMPLES, expected)
    assert chi_square_ok(expected * SAMPLES, expected)


def test_tree_verification_commits_each_token_with_its_model_probability():
    """Drafts from one head that share and split prefixes: the first token after the head is still a sample."""
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 3)  # the same distribution at every position, for every draft
    drafts = [[0, 1, 2], [0, 3, 1], [0, 1, 3], [0, 3, 1]]
    generator, counts = torch.Generator().manual_seed(0), torch.zeros(4)
    for _ in range(SAMPLES):
        winner, verdict = speculative_verify_tree(drafts, lambda i: probs, generator)
        counts[drafts[winner][1] if verdict.accepted > 1 else verdict.next_head] += 1
        accepted = drafts[winner][: verdict.accepted]
        assert winner == next(i for i, d in enumerate(drafts) if d[: verdict.accepted] == accepted)  # the first
    assert chi_square_ok(counts, probs[0])


def test_filter_probs_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert torch.allclose(filter_probs(logits, 1.0, top_k=2)[0], torch.tensor([5 / 7, 2 / 7, 0, 0, 0]))
    # top-p 0.8 keeps tokens while the mass before them is < 0.8: 0.5, 0.2, 0.15
    assert torch.allclose(filter_probs(logits, 1.0, top_p=0.8)[0], torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85)
