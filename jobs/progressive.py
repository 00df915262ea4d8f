"""Progressive Jacobi Forcing, end to end, as one Ray job.

    python jobs/progressive.py --config jobs/configs/quickstart.yaml [key=value ...]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/progressive.py --config jobs/configs/smoke.yaml run_dir=/abs/path/runs/smoke

Joins the Ray cluster of ``--address`` or RAY_ADDRESS (set by ``ray job submit``), else starts a local one
(docs/cluster.md): here, once; the stages below run on it. Re-running the same
command resumes: finished stages are skipped. ``--rerun STAGE`` redoes a stage and everything after it.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jobs/configs/quickstart.yaml", help="YAML config of the run")
    parser.add_argument("--rerun", default=None, help="redo this stage and all after it (e.g. round1.train)")
    parser.add_argument("--address", default=None, help="Ray cluster to join (= ray_address=...; default RAY_ADDRESS)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. run_dir=/tmp/run rounds.0.steps=50")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from jf_ray.config import ConfigError
    from jf_ray.errors import UserInputError
    from jf_ray.pipeline import PipelineConfig, run_pipeline
    from jf_ray.raycluster import init_ray, prepare_local_ray
    from jf_ray.storage import check_writable

    try:
        overrides = args.overrides + ([f"ray_address={args.address}"] if args.address else [])
        cfg = PipelineConfig.load(args.config, overrides)
        prepare_local_ray(cfg.ray_address)  # before ray is first imported
        check_writable(cfg.run_dir, "run_dir")  # a missing bucket or bad credentials fail now, not after a stage
        init_ray(cfg.ray_address)
        result = run_pipeline(cfg, rerun=args.rerun)
    except (ConfigError, UserInputError) as exc:
        print(f"progressive: error: {exc}", file=sys.stderr)
        return 2
    report = result.outputs.report.markdown_uri
    print(f"done: {len(result.executed)} stages run, {len(result.skipped)} skipped; report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
