"""The one config builder of the ``jf-ray`` subcommands: ``--config`` YAML < flags < ``--set`` (docs/README.md)."""

from __future__ import annotations

import importlib

import pytest
import yaml

from jf_ray.cli.common import apply_overrides, config_data
from jf_ray.cli.main import build_parser, main

# command, the arguments its config needs, a field (dotted) its flag sets, the flag, three values.
CASES = [
    ("collect", {"model": "m", "prompts": "p.jsonl", "out": "o"}, "block_size", "--block-size", (8, 16, 32)),
    ("pack", {"trajectories": "t", "out": "o"}, "window", "--window", (4, 8, 12)),
    ("train", {"model": "m", "data": "d", "out": "o"}, "loss.ar_weight", "--ar-weight", (0.5, 0.7, 0.9)),
    ("serve", {"model": "m"}, "decode.block_size", "--block-size", (8, 16, 32)),
    ("eval", {"model": "m", "task": "math"}, "decode.block_size", "--block-size", (8, 16, 32)),
]


def _dotted(data: dict, key: str):
    for part in key.split("."):
        data = data[part]
    return data


def _yaml_with(tmp_path, base: dict, key: str, value) -> str:
    data = dict(base)
    apply_overrides(data, [f"{key}={value}"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize(("command", "base", "key", "flag", "values"), CASES, ids=[c[0] for c in CASES])
def test_yaml_then_flags_then_set(tmp_path, command, base, key, flag, values):
    from_yaml, from_flag, from_set = values
    flags = importlib.import_module(f"jf_ray.cli.{command}").FLAGS
    config = ["--config", _yaml_with(tmp_path, base, key, from_yaml)]

    def settled(*extra: str):
        return _dotted(config_data(build_parser().parse_args([command, *config, *extra]), flags), key)

    assert settled() == from_yaml
    assert settled(flag, str(from_flag)) == from_flag
    assert settled(flag, str(from_flag), "--set", f"{key}={from_set}") == from_set
    assert settled("--set", f"{key}={from_set}", flag, str(from_flag)) == from_set  # order on the line: no matter


@pytest.mark.parametrize("command", [c[0] for c in CASES] + ["base build"])
def test_every_help_states_the_precedence(command, capsys):
    with pytest.raises(SystemExit):
        main([*command.split(), "--help"])
    assert "the --config YAML, then explicit flags, then --set KEY=VALUE" in " ".join(capsys.readouterr().out.split())


def test_a_missing_required_setting_names_its_flag(tmp_path, capsys):
    assert main(["pack", "--out", str(tmp_path / "packed")]) == 2
    assert "--trajectories" in capsys.readouterr().err
    config = _yaml_with(tmp_path, {"trajectories": "t"}, "out", str(tmp_path / "packed"))
    args = build_parser().parse_args(["pack", "--config", config])  # the YAML may give what the flag would
    assert config_data(args, importlib.import_module("jf_ray.cli.pack").FLAGS)["trajectories"] == "t"


def test_boolean_flags_set_only_when_given():
    from jf_ray.cli.collect import FLAGS

    base = ["collect", "--model", "m", "--prompts", "p", "--out", "o"]
    assert "resume" not in config_data(build_parser().parse_args(base), FLAGS)
    assert config_data(build_parser().parse_args([*base, "--no-resume"]), FLAGS)["resume"] is False


def test_unknown_keys_and_bad_values_exit_2(tmp_path, capsys):
    assert main(["pack", "--trajectories", "t", "--out", str(tmp_path / "o"), "--set", "windw=3"]) == 2
    assert "windw" in capsys.readouterr().err
    assert main(["eval", "--model", "m", "--task", "math", "--set", "decode.block_size=0"]) == 2
    assert "decode.block_size" in capsys.readouterr().err


def test_base_build_layers_preset_fields(tmp_path):
    config = _yaml_with(tmp_path, {"steps": 5}, "lr", 0.01)
    args = build_parser().parse_args(["base", "build", "--out", "o", "--config", config, "--set", "steps=7"])
    assert config_data(args, ()) == {"steps": 7, "lr": 0.01}


def test_eval_config_decode_defaults_follow_the_task():
    from jf_ray.evaluation import DEFAULT_MAX_NEW_TOKENS, EvalConfig

    config = EvalConfig.from_dict({"model": "m", "task": "code", "seed": 3, "decode": {"block_size": 8}})
    assert (config.decode.decoder, config.decode.max_new_tokens, config.decode.seed) == (
        "ar",
        DEFAULT_MAX_NEW_TOKENS["code"],
        3,
    )
    config = EvalConfig.from_dict({"model": "m", "task": "math", "decode": {"decoder": "mr", "max_new_tokens": 5}})
    assert (config.decode.decoder, config.decode.max_new_tokens, config.decode.seed) == ("multiblock", 5, 0)


def test_apply_overrides_sets_dotted_keys_in_order():
    data = {"a": {"b": 1}}
    assert apply_overrides(data, ["a.b=2", "c=[1, 2]", "a.b=3"]) is data
    assert data == {"a": {"b": 3}, "c": [1, 2]}
