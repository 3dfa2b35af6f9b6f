"""Run configurations: YAML files (hkd/configs/NAME.yaml or any path) plus `key.sub=value` overrides.

A config is a nested dict with one section per stage (data, teacher, trajectories, model, train, ...).
Each module turns its section into its own dataclass with `section(config, "name", DataclassType)`, so an
unknown or misspelt key is reported by name, before any work starts.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"
T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file or key."""


def available() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load(name_or_path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """Read a named config (see `available()`) or a YAML path, then apply `a.b=value` overrides (YAML values)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"config {str(name_or_path)!r} not found (named configs: {', '.join(available())})")
    config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a config is a mapping of sections")
    return apply_overrides(config, overrides)


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    config = copy.deepcopy(config)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(value)
    return config


def section(config: dict[str, Any], name: str, cls: type[T]) -> T:
    """config[name] as the dataclass `cls`; unknown keys are an error naming them and the valid ones."""
    values = config.get(name) or {}
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; valid: {', '.join(sorted(fields))}"
        )
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """A config dataclass as plain YAML/JSON-friendly values (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(obj))
