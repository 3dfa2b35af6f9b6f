"""The machinery of run configurations, below the stages that define sections (hkd.config is the API above them).

A config's sections, as written, are a plain dict: `read` gives a YAML file's (hkd/configs/NAME.yaml or any path),
`apply_overrides` applies `section.key=value` overrides. Each section is a frozen dataclass deriving from `Section`
(`@dataclass(frozen=True) class TrainConfig(Section, name="train")`): its fields' annotations are the types, checked
(and lists made tuples, ints made floats) whenever the dataclass is built, and its `check()` holds the rules on
values; `section` builds one from a dict, naming an unknown key, a value of the wrong type or out of range (and the
closest valid name) in a ConfigError. `changes` lists what differs between two configs' sections.

YAML is read as YAML 1.2 reads numbers: `1e-4` is a float (PyYAML's YAML 1.1 would make it a string). Aliases
(`*name`) are refused, in files and overrides alike: a few hundred bytes of nested aliases expand to gigabytes. A
config file is at most CONFIG_BYTES; a number that is NaN or infinite is an error naming its key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from hkd.errors import ConfigError, brief

CONFIG_DIR = Path(__file__).parent / "configs"
# The modules that define the sections: importing them registers their dataclasses in SECTIONS.
SECTION_MODULES = ("hkd.data", "hkd.teacher", "hkd.trajectories", "hkd.model", "hkd.train_config")
SECTIONS: dict[str, type[Section]] = {}
T = TypeVar("T")
CONFIG_BYTES = 1 << 20  # the largest config file read

__all__ = [
    "ConfigError",
    "Section",
    "apply_overrides",
    "available",
    "changes",
    "choose_device",
    "read",
    "section",
    "sections",
    "to_dict",
]


class _Loader(yaml.SafeLoader):
    """safe_load with YAML 1.2 floats: an exponent without a decimal point (1e-4, 5E+3) is a number; and no aliases."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in hkd configs", mark)
        return super().compose_node(parent, index)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass: plain values only)


# ---------------------------------------------------------------------------------------------------------------
# Sections


def _suggest(name: str, valid: typing.Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            plural = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
            return f"a list of {plural.get(args[0], _describe(args[0]))}"
        return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _coerce(value: Any, hint: Any) -> Any:
    """`value` as the annotation `hint` says (list -> tuple, int -> float), or TypeError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arm)
            except TypeError:
                pass
        raise TypeError
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if len(value) != len(args):
            raise TypeError
        return tuple(_coerce(v, a) for v, a in zip(value, args, strict=True))
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (bool, str) and isinstance(value, hint):
        return value
    if origin is dict and isinstance(value, dict):
        return value
    raise TypeError


class Section:
    """Base of the config dataclasses. `@dataclass(frozen=True) class XConfig(Section, name="x")` registers the
    section `x`; building one checks every field against its annotation, then calls `check()` (override it for the
    rules on values and raise ConfigError naming the key)."""

    section_name = ""

    def __init_subclass__(cls, name: str = "", **kwargs):
        super().__init_subclass__(**kwargs)
        if name:
            cls.section_name = name
            SECTIONS[name] = cls

    def __post_init__(self) -> None:
        check_types(self, self.section_name)
        self.check()

    def check(self) -> None:
        """Rules on the values (ranges, choices); raise ConfigError naming the key."""

    def require(self, condition: bool, key: str, rule: str) -> None:
        """ConfigError `section.key must be RULE, got VALUE` unless `condition`."""
        if not condition:
            raise ConfigError(f"{self.section_name}.{key} must be {rule}, got {brief(getattr(self, key))}")


def section(config: dict[str, Any], name: str, cls: type[T]) -> T:
    """config[name] as the dataclass `cls`: an unknown key is an error naming it and the closest valid key, a value
    of the wrong type or out of range an error naming it."""
    values = config.get(name)
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"config section {name!r} must be a mapping of keys, got {brief(values)}")
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in fields:
            hint = _suggest(str(key)[:100], fields, f"{name}.")
            raise ConfigError(f"unknown key {name}.{brief(key, plain=True)}{hint}; valid: {', '.join(fields)}")
    result = cls(**values)
    if not isinstance(result, Section):  # a plain dataclass: its types are checked here
        check_types(result, name)
    return result


def check_types(obj: Any, name: str) -> None:
    """Every field of the dataclass `obj` as its annotation says (list -> tuple, int -> float), or a ConfigError."""
    hints = typing.get_type_hints(type(obj))
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        try:
            object.__setattr__(obj, field.name, _coerce(value, hints[field.name]))  # frozen dataclasses too
        except TypeError:
            rule = _describe(hints[field.name])
            raise ConfigError(f"{name}.{field.name} must be {rule}, got {brief(value)}") from None
        if not finite(value):
            raise ConfigError(f"{name}.{field.name} must be finite and within 64 bits, got {brief(value)}")


def finite(value: Any) -> bool:
    """No NaN, infinite or beyond-64-bit number anywhere in a nested value (dicts, lists, tuples, numbers)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, int):
        return abs(value) < 2**63
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(finite(v) for v in value)
    return True


def sections() -> dict[str, type[Section]]:
    """Every registered section (importing the modules that define them), in the pipeline's order (SECTION_MODULES)
    whatever the order the modules were imported in."""
    for module in SECTION_MODULES:
        importlib.import_module(module)
    order = {module: i for i, module in enumerate(SECTION_MODULES)}
    return dict(sorted(SECTIONS.items(), key=lambda item: order.get(item[1].__module__, len(order))))


def check_names(config: dict[str, Any]) -> None:
    """A ConfigError naming the first section of `config` that no stage defines (and the closest one that does)."""
    known = sections()
    for name in config:
        if name not in known:
            hint = _suggest(str(name)[:100], known)
            raise ConfigError(f"unknown config section {brief(name)}{hint}; valid: {', '.join(known)}")


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`section.key: old -> new` for every value that differs between two configs (defaults filled in)."""
    found = []
    for name, cls in sections().items():
        a, b = (to_dict(section(c, name, cls)) for c in (old, new))
        found += [f"{name}.{k}: {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k]]
    return found


# ---------------------------------------------------------------------------------------------------------------
# Files and overrides


def available() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def read(name_or_path: str | Path) -> dict[str, Any]:
    """The sections of a named config (see `available()`) or a YAML path, as a plain dict (unchecked: hkd.config.load
    parses them)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"config {str(name_or_path)!r} not found (named configs: {', '.join(available())})")
    if path.stat().st_size > CONFIG_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes, larger than a config may be ({CONFIG_BYTES} bytes)")
    try:
        config = parse_yaml(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as error:
        raise ConfigError(f"{path}: not a readable YAML file ({str(error).splitlines()[0]})") from error
    config = config or {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a config is a mapping of sections")
    return config


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    config = copy.deepcopy(config)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {brief(item)} is not of the form section.key=value")
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {brief(item)}: {brief(part)} is not a section")
        try:
            node[leaf] = parse_yaml(value)
        except yaml.YAMLError as error:
            raise ConfigError(f"override {brief(item)}: not a YAML value ({str(error).splitlines()[0]})") from error
    return config


def to_dict(obj: Any) -> dict[str, Any]:
    """A config dataclass as plain YAML/JSON-friendly values (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(obj))


def choose_device(name: str, what: str = "--device"):
    """The torch.device that `name` (auto, cpu or cuda; the option or config key `what`) chooses: auto is the GPU
    when there is one, else the CPU; cuda without a GPU is a ConfigError naming `what`."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what}=cuda: no CUDA GPU is available")
    return torch.device(name)
