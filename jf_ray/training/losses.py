"""Jacobi Forcing losses on the logits of one packed forward (docs/method-notes.md §6).

``total = consistency_weight * consistency + ar_weight * ar + anchor_weight * anchor``

* consistency (progressive consistency loss): for every (noisy, clean) pair of positions chosen by the
  collate, ``KL(teacher || student) * tau^2`` with ``teacher = softmax(clean logits / tau)`` detached (the
  same model on the clean stream, stop-gradient) and ``student = softmax(noisy logits / tau)``. This has the
  gradient of the official soft cross-entropy; subtracting the teacher entropy only makes the value 0 when
  the student matches, so it reads as a distance.
  Normalisation (``reduction``):
    - ``token`` (default): mean over all pairs of the micro-batch. The official code additionally divides by
      the number of blocks N, which shrinks the loss for long answers; we do not (docs/method-notes.md §6).
    - ``block``: the paper's Eq. 8: KL summed over each block's pairs, averaged over blocks that have pairs.
* ar: hard-label cross-entropy, mean over the AR targets of the clean stream (EOS included).
* anchor: the same cross-entropy over anchor rows (plain text or prompt+answer pairs that keep the language
  model from drifting when training on its own outputs for long).

Each part is a mean within the micro-batch; with gradient accumulation the trainer averages micro-batches.
All losses are computed in fp32 whatever the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from jf_ray.training.batches import IGNORE, PackedBatch
from jf_ray.training.config import Reduction


@dataclass
class LossParts:
    total: torch.Tensor
    consistency: torch.Tensor
    ar: torch.Tensor
    anchor: torch.Tensor
    consistency_pairs: int
    ar_targets: int
    anchor_targets: int

    def to_metrics(self) -> dict[str, float]:
        return {
            "loss": float(self.total.detach()),
            "loss_consistency": float(self.consistency.detach()),
            "loss_ar": float(self.ar.detach()),
            "loss_anchor": float(self.anchor.detach()),
        }


def consistency_kl(
    flat_logits: torch.Tensor,
    student_index: torch.Tensor,
    teacher_index: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-pair ``KL(teacher || student) * tau^2`` for rows of ``flat_logits`` (``(B*L, V)``)."""
    student = flat_logits.index_select(0, student_index).float() / temperature
    teacher = flat_logits.index_select(0, teacher_index).detach().float() / temperature
    teacher_log_probs = F.log_softmax(teacher, dim=-1)
    student_log_probs = F.log_softmax(student, dim=-1)
    kl = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(-1)
    return kl * temperature**2


def consistency_loss(
    logits: torch.Tensor,
    batch: PackedBatch,
    temperature: float = 1.0,
    reduction: Reduction = "token",
) -> torch.Tensor:
    flat = logits.reshape(-1, logits.shape[-1])
    if batch.student_index.numel() == 0:
        return flat.sum() * 0.0  # keeps the graph (and DDP's gradient hooks) intact
    kl = consistency_kl(flat, batch.student_index, batch.teacher_index, temperature)
    if reduction == "token":
        return kl.mean()
    if reduction == "block":
        blocks, inverse = torch.unique(batch.pair_block, return_inverse=True)
        per_block = torch.zeros(len(blocks), dtype=kl.dtype, device=kl.device).index_add_(0, inverse, kl)
        return per_block.mean()
    raise ValueError(f"unknown consistency reduction {reduction!r}; choose token or block")


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over positions with a label; only those rows are cast to fp32."""
    flat = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    rows = (flat_labels != IGNORE).nonzero(as_tuple=True)[0]
    if rows.numel() == 0:
        return flat.sum() * 0.0, 0
    return F.cross_entropy(flat.index_select(0, rows).float(), flat_labels[rows]), int(rows.numel())


def jacobi_forcing_loss(
    logits: torch.Tensor,
    batch: PackedBatch,
    ar_weight: float = 1.0,
    anchor_weight: float = 1.0,
    temperature: float = 1.0,
    reduction: Reduction = "token",
    consistency_weight: float = 1.0,
) -> LossParts:
    consistency = consistency_loss(logits, batch, temperature, reduction)
    ar, ar_targets = next_token_loss(logits, batch.ar_labels)
    anchor, anchor_targets = next_token_loss(logits, batch.anchor_labels)
    total = consistency_weight * consistency + ar_weight * ar + anchor_weight * anchor
    return LossParts(
        total=total,
        consistency=consistency,
        ar=ar,
        anchor=anchor,
        consistency_pairs=int(batch.student_index.numel()),
        ar_targets=ar_targets,
        anchor_targets=anchor_targets,
    )
