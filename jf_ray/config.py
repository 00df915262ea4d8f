"""Typed stage configs: pydantic models loadable from YAML with ``key=value`` overrides.

Every stage config subclasses :class:`StageConfig`. Unknown keys are rejected so that a typo in a YAML
file or on the command line is an error naming the key, not a silently ignored setting.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

C = TypeVar("C", bound="StageConfig")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the offending key."""


def _absolute_location(value: str) -> str:
    """A bare relative path becomes absolute against the directory the config was loaded in; URIs are kept.

    Ray Train workers, actors and Serve replicas run in other working directories, so a relative path handed
    to them would point somewhere else (or nowhere).
    """
    if value and "://" not in value:
        return os.path.abspath(os.path.expanduser(value))
    return value


def _absolute_if_existing_path(value: str) -> str:
    """Like :func:`_absolute_location` for model references, which may also be hub names (``org/name``)."""
    return _absolute_location(value) if os.path.exists(os.path.expanduser(value)) else value


def _known_fetch_reference(value: str) -> str:
    """``fetch://NAME[?route=...]`` must name a known model: an error at load, listing the known ones, not
    after the stages before the first model load have run."""
    from jf_ray.model_fetch import is_fetch_reference, parse_fetch_reference

    if is_fetch_reference(value):
        parse_fetch_reference(value)
    return value


Location = Annotated[str, AfterValidator(_absolute_location)]  # storage URI or local path
# Checkpoint URI, path, hub name, .gguf file or fetch://NAME (a known model, jf_ray.model_fetch).
ModelLocation = Annotated[str, AfterValidator(_absolute_if_existing_path), AfterValidator(_known_fetch_reference)]
# Model dtypes by jf-ray's names (auto: bf16 on GPU, fp32 on CPU); jf_ray.modeling and vllm_engine map them.
DTYPE_NAMES: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
DType = Literal[DTYPE_NAMES]


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @classmethod
    def load(cls: type[C], path: str | Path | None = None, overrides: Iterable[str] = ()) -> C:
        """Build the config from an optional YAML file, then apply ``key=value`` (dotted) overrides."""
        data: dict[str, Any] = {}
        if path is not None:
            data = read_yaml(path)
        for item in overrides:
            key, value = parse_override(item)
            set_dotted(data, key, value)
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(cls.__name__, exc)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start})") from None
    # ValueError: a scalar YAML resolves but cannot build (2024-13-45 as a date, an integer of 5000 digits);
    # RecursionError: the parser recurses once per nesting level.
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=3`` -> ("a.b", 3). Values are parsed as YAML scalars/lists (``[1,2]``, ``true``, ``null``)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError):  # not YAML (or a date that is none): the text itself
        value = raw
    except RecursionError:
        raise ConfigError(f"override {key!r}: value nested too deeply") from None
    return key, value


def _yaml_problem(exc: Exception) -> str:
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc)


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in nested mappings; a numeric part indexes a list already present (``rounds.0.steps``)."""
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {key!r}: {part!r} is not an index of a list of {len(node)}")
            if last:
                node[int(part)] = value
                return
            node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
                return
            node = node.setdefault(part, {})
        else:
            raise ConfigError(f"override {key!r}: {'.'.join(parts[:depth])!r} is not a section")


def format_validation_error(name: str, exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        problems.append(f"{loc}: {err['msg']}")
    return f"invalid {name}: " + "; ".join(problems)
