"""``jf-ray train``: Jacobi Forcing post-training on packed sequences with a Ray TorchTrainer.

DDP over gloo on CPU (nccl with --use-gpu), FSDP2 with --strategy fsdp; AdamW (0.9, 0.95), cosine schedule
with warm-up, gradient accumulation; HF-format checkpoints under ``<out>/<run-name>/``; re-running with the
same --out and --run-name resumes from the latest checkpoint. Settings come from ``--config`` YAML, then
``--set key=value`` (e.g. ``--set loss.reduction=block``), then flags.
"""

from __future__ import annotations

import json

from jf_ray.cli.common import join_or_start_ray
from jf_ray.cli.pack import add_config_options, config_from_args

_FIELD_FLAGS = (
    ("--model", str, "model to start from: HF dir, file:// or s3:// URI, hub name"),
    ("--data", str, "URI of the packed dataset (jf-ray pack --out)"),
    ("--out", str, "URI for checkpoints, metrics log and summary"),
    ("--run-name", str, "run name under --out (same name = resume)"),
    ("--workers", int, "data-parallel workers"),
    ("--cpus-per-worker", int, "CPUs (torch threads) per worker"),
    ("--use-gpu", bool, "one GPU per worker"),
    ("--strategy", str, "ddp | fsdp"),
    ("--epochs", float, "passes over the data"),
    ("--steps", int, "optimizer steps (overrides --epochs)"),
    ("--lr", float, "peak learning rate"),
    ("--warmup-ratio", float, "share of steps in warm-up"),
    ("--micro-batch-size", int, "packed sequences per micro-batch per worker"),
    ("--grad-accum", int, "micro-batches per optimizer step"),
    ("--max-row-tokens", int, "pack several sequences per row of this many tokens"),
    ("--mask", str, "nc | clean_context | nc_ic"),
    ("--ar-weight", float, "w in L = L_pc + w * L_AR"),
    ("--anchor", str, "JSONL URI of anchor sequences trained with AR loss"),
    ("--anchor-ratio", float, "anchor sequences per packed sequence"),
    ("--checkpoint-every", int, "checkpoint every N steps (0 = at the end only)"),
    ("--seed", int, "seed"),
)
_RENAMES = {"mask": "mask.kind", "ar_weight": "loss.ar_weight"}


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="Jacobi Forcing training on Ray Train", description=__doc__)
    add_config_options(parser, "TrainConfig", _FIELD_FLAGS)
    parser.set_defaults(func=run)


def run(args) -> int:
    from jf_ray.storage import check_writable
    from jf_ray.training.config import TrainConfig
    from jf_ray.training.ray_train import train

    config = config_from_args(TrainConfig, args, _FIELD_FLAGS, _RENAMES)
    join_or_start_ray(args)
    check_writable(config.out, "--out")
    summary = train(config)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    metrics = summary["metrics"]
    print(
        f"trained {metrics.get('step')} steps in {summary['wall_s']:.1f}s: loss {metrics.get('loss'):.4f} "
        f"(consistency {metrics.get('loss_consistency'):.4f}, ar {metrics.get('loss_ar'):.4f}), "
        f"{metrics.get('tokens_per_s'):.0f} tokens/s"
    )
    print(f"model: {summary['model']}")
    print(f"checkpoint: {summary['checkpoint']}")
    print(f"metrics log: {summary['metrics_log']}")
    return 0
