"""The benchmark package's shared parts and the ``jf-ray bench`` command group (no model, no Ray)."""

from __future__ import annotations

import math

import pytest

from jf_ray.cli.main import main


def test_speedup_is_the_median_of_paired_ratios_and_one_pair_is_the_plain_ratio():
    from jf_ray.bench.common import speedup

    # the machine slowed threefold after the first pair: pairs 2, 4, 2 -> median 2 (medians' ratio: 3)
    assert speedup([20.0, 20.0, 40.0], [10.0, 5.0, 20.0]) == (2.0, 2.0, 4.0)
    assert speedup([25.0], [10.0]) == (2.5, 2.5, 2.5)
    assert speedup([3.0, math.nan], [0.0, 1.0]) is None  # no reference progress / an untimed run: no pair left
    with pytest.raises(ValueError):
        speedup([1.0, 2.0], [1.0])  # repeats are paired one to one


def test_machine_record_names_the_machine_and_its_load_at_both_ends():
    from jf_ray.bench.common import MachineRecord

    record = MachineRecord.start().finish("fp32")
    load = {"cpus", "platform", "python", "torch", "transformers", "load_avg_start", "load_avg_end", "wall_s"}
    processor = {"cpu_model", "cpu_features", "cpu_threads", "native_bf16", "native_bf16_source", "precision"}
    assert set(record) == load | processor
    assert len(record["load_avg_start"]) == len(record["load_avg_end"]) == 3 and record["cpus"] >= 1
    assert record["torch"] and record["wall_s"] >= 0 and record["precision"] == "fp32"
    assert record["cpu_model"] and record["cpu_threads"] >= 1


def test_bench_help_lists_the_four_benchmarks(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("decoders", "collect", "train", "serve"))


@pytest.mark.parametrize(
    "argv",
    [
        ["bench"],  # no benchmark named
        ["bench", "bench-serve"],
        ["bench", "serve", "--concurrency", "0"],
        ["bench", "serve", "--reference", "vllm"],
        ["bench", "train", "--model", "m", "--data", "d", "--workers", "1,x"],
        ["bench", "collect", "--model", "m"],  # --prompts missing
        ["bench", "decoders", "--model", "m", "--prompts", "p", "--decoders", "nope"],
    ],
)
def test_bench_bad_arguments_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("jf-ray bench") and "error:" in err and len(err.strip().splitlines()) == 1


def test_bench_bad_settings_exit_2_before_any_work(tmp_path, capsys):
    assert main(["bench", "serve", "--url", "http://127.0.0.1:9", "--set", "max_batch_size=4"]) == 2
    assert "--set configures the local app" in capsys.readouterr().err
    assert main(["bench", "serve", "--decoders", "ar", "--concurrency", "1", "--no-offline"]) == 2
    assert "pass --model" in capsys.readouterr().err
    assert main(["bench", "serve", "--url", "http://127.0.0.1:9", "--decoders", "none"]) == 2
    assert "--decoders none needs at least one --reference" in capsys.readouterr().err
    argv = ["bench", "train", "--model", str(tmp_path), "--data", "file:///nowhere", "--steps", "3", "--skip", "3"]
    assert main(argv) == 2
    assert "--skip" in capsys.readouterr().err


def test_set_option_overrides_dotted_fields_of_the_local_app():
    from jf_ray.cli.bench_serve import local_config
    from jf_ray.cli.main import build_parser

    argv = ["bench", "serve", "--model", "/m", "--concurrency", "2,8", "--max-tokens", "32"]
    args = build_parser().parse_args([*argv, "--set", "decode.block_size=16", "--set", "max_queued_requests=64"])
    config = local_config(args)
    assert (config.decode.block_size, config.max_queued_requests, config.max_batch_size) == (16, 64, 8)
    assert config.default_max_tokens == 32
