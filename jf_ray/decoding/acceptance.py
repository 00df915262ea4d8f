"""Verification of a draft against the model's own predictions: small pure tensor functions.

Convention used everywhere: a segment fed to the model is ``[head, d_1, ..., d_{L-1}]`` where ``head`` is
already known to be correct; the logits at offset ``i`` predict the token at offset ``i + 1``. Accepting
``a`` tokens means the head and the ``a - 1`` drafted tokens after it are correct, and one more token (the
prediction after the last accepted one) becomes the next head. So every forward gains ``a >= 1`` tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Verdict:
    accepted: int  # a: head + matched draft tokens (their KV is exact and is committed)
    next_head: int  # the token after the accepted prefix; known correct (greedy) or exactly sampled


def greedy_verify(draft: list[int], predictions: list[int]) -> Verdict:
    """``predictions[i]`` is the argmax at offset i. Accept the longest prefix the model agrees with."""
    matched = 0
    for guess, predicted in zip(draft[1:], predictions):
        if guess != predicted:
            break
        matched += 1
    return Verdict(accepted=matched + 1, next_head=predictions[matched])


MIN_TEMPERATURE = 1e-5  # sampling temperatures below it sample as this one


def filter_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Sampling distribution of each row of ``logits`` [..., V]: temperature, then top-k, then top-p."""
    # Below MIN_TEMPERATURE, logits / temperature overflows float32 (1e-45 is 0 in float32): the softmax is NaN
    # and the whole batch's step fails. There the distribution is a point mass on the argmax anyway.
    probs = torch.softmax(logits.float() / max(temperature, MIN_TEMPERATURE), dim=-1)
    if top_k and top_k < probs.shape[-1]:
        kth = torch.topk(probs, top_k, dim=-1).values[..., -1:]
        probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = torch.where(mass_before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return probs / probs.sum(dim=-1, keepdim=True)


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(probs, 1, generator=generator).item())


def speculative_verify(draft: list[int], probs: torch.Tensor, generator: torch.Generator) -> Verdict:
    """Distribution-preserving acceptance of a point-mass draft (speculative sampling, one-hot proposal).

    Draft token ``d`` at offset i+1 is accepted with probability ``p_i(d)`` (= min(1, p/q) with q = 1). On
    the first rejection the replacement is drawn from the residual ``max(p_i - q, 0)``, i.e. ``p_i`` with
    ``d`` removed and renormalised. If the whole draft is accepted the next token is drawn from the last
    distribution. Every committed token is therefore an exact sample of the model's distribution.
    """
    uniforms = torch.rand(len(draft) - 1, generator=generator).tolist()
    for i, guess in enumerate(draft[1:]):
        if uniforms[i] < float(probs[i, guess]):
            continue
        residual = probs[i].clone()
        residual[guess] = 0.0
        total = float(residual.sum())
        if total <= 0.0:  # p_i is a point mass on the guess up to rounding: it is accepted
            continue
        return Verdict(accepted=i + 1, next_head=sample(residual / total, generator))
    return Verdict(accepted=len(draft), next_head=sample(probs[len(draft) - 1], generator))


def speculative_verify_tree(
    drafts: list[list[int]], probs_of: Callable[[int], torch.Tensor], generator: torch.Generator
) -> tuple[int, Verdict]:
    """Distribution-preserving acceptance of several point-mass drafts from the same head: a token tree.

    Walking down from the head, the distinct next tokens of the drafts that still agree with everything
    accepted are tried in order, each accepted with its probability under the residual the ones rejected
    before it left (recursive rejection sampling: token ``d`` is then accepted with probability ``p(d)``
    overall); once all are rejected the next token is drawn from the last residual. With one draft this is
    :func:`speculative_verify`. Returns the first draft holding the accepted prefix and its verdict; a node's
    distribution is read from that draft's ``probs_of(i)`` [len, V] (every draft through the node has the
    same prefix, so it is the same distribution).
    """
    live, depth, probs = list(range(len(drafts))), 0, {}
    while True:
        lead = live[0]
        if lead not in probs:
            probs[lead] = probs_of(lead)
        children = list(dict.fromkeys(drafts[i][depth + 1] for i in live if len(drafts[i]) > depth + 1))
        token, residual = _recursive_rejection(children, probs[lead][depth], generator)
        if token is None:
            return lead, Verdict(accepted=depth + 1, next_head=sample(residual, generator))
        live = [i for i in live if len(drafts[i]) > depth + 1 and drafts[i][depth + 1] == token]
        depth += 1


def _recursive_rejection(tokens: list[int], probs: torch.Tensor, generator: torch.Generator):
    """Try each point-mass proposal in turn: (the accepted token, probs) or (None, the residual to sample from)."""
    for token in tokens:
        if float(torch.rand(1, generator=generator)) < float(probs[token]):
            return token, probs
        residual = probs.clone()
        residual[token] = 0.0
        total = float(residual.sum())
        if total <= 0.0:  # probs is a point mass on the token up to rounding: it is accepted
            return token, probs
        probs = residual / total
    return None, probs
