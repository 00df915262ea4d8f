"""``jf-ray train``: Jacobi Forcing post-training on packed sequences with a Ray TorchTrainer.

DDP over gloo on CPU (nccl with --use-gpu), FSDP2 with --strategy fsdp; AdamW (0.9, 0.95), cosine schedule
with warm-up, gradient accumulation; HF-format checkpoints under ``<out>/<run-name>/``; re-running with the
same --out and --run-name resumes from the latest checkpoint. Settings: a TrainConfig from ``--config`` YAML,
then flags, then ``--set key=value`` (e.g. ``--set loss.reduction=block``).
"""

from __future__ import annotations

import json

from jf_ray.cli.common import FieldFlag, add_address_option, add_config_options, config_from_args, join_or_start_ray

FLAGS = (
    FieldFlag("--model", "model to start from: HF dir, file:// or s3:// URI, hub name", required=True),
    FieldFlag("--data", "URI of the packed dataset (jf-ray pack --out)", required=True),
    FieldFlag("--out", "URI for checkpoints, metrics log and summary", required=True),
    FieldFlag("--run-name", "run name under --out (same name = resume)"),
    FieldFlag("--workers", "data-parallel workers", int),
    FieldFlag("--cpus-per-worker", "CPUs (torch threads) per worker", int),
    FieldFlag("--use-gpu", "one GPU per worker", bool),
    FieldFlag("--strategy", "ddp | fsdp"),
    FieldFlag("--epochs", "passes over the data", float),
    FieldFlag("--steps", "optimizer steps (overrides --epochs)", int),
    FieldFlag("--lr", "peak learning rate", float),
    FieldFlag("--warmup-ratio", "share of steps in warm-up", float),
    FieldFlag("--micro-batch-size", "packed sequences per micro-batch per worker", int),
    FieldFlag("--grad-accum", "micro-batches per optimizer step", int),
    FieldFlag("--max-row-tokens", "pack several sequences per row of this many tokens", int),
    FieldFlag("--mask", "nc | clean_context | nc_ic", key="mask.kind"),
    FieldFlag("--ar-weight", "w in L = L_pc + w * L_AR", float, key="loss.ar_weight"),
    FieldFlag("--anchor", "JSONL URI of anchor sequences trained with AR loss"),
    FieldFlag("--anchor-ratio", "anchor sequences per packed sequence", float),
    FieldFlag("--checkpoint-every", "checkpoint every N steps (0 = at the end only)", int),
    FieldFlag("--seed", "seed", int),
)


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="Jacobi Forcing training on Ray Train", description=__doc__)
    add_config_options(parser, "TrainConfig", FLAGS)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_address_option(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from jf_ray.storage import check_writable
    from jf_ray.training.config import TrainConfig
    from jf_ray.training.ray_train import train

    config = config_from_args(TrainConfig, args, FLAGS)
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
