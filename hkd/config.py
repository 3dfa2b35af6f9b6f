"""Run configurations, parsed once: `load` reads a YAML file (hkd/configs/NAME.yaml or any path) plus
`section.key=value` overrides into a `RunConfig`, one typed, frozen section per stage (`config.train.lr`), and each
stage is handed the section(s) it needs. An unknown section or key, a value of the wrong type or out of range is a
ConfigError naming it (and the closest valid name) before any work starts. The sections as written (`RunConfig.raw`,
a plain dict) are what checkpoints and run folders store; `section` reads one back from such a dict. The machinery
(YAML, overrides, the Section base class) is hkd.sections, below the stages that define the sections.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from hkd.data import DataConfig
from hkd.model import ModelConfig
from hkd.sections import (
    CONFIG_BYTES,
    CONFIG_DIR,
    ConfigError,
    Section,
    apply_overrides,
    available,
    changes,
    check_names,
    choose_device,
    parse_yaml,
    read,
    section,
    sections,
    to_dict,
)
from hkd.teacher import TeacherConfig
from hkd.train_config import TrainConfig
from hkd.trajectories import TrajectoryConfig

__all__ = [
    "CONFIG_BYTES",
    "CONFIG_DIR",
    "ConfigError",
    "RunConfig",
    "Section",
    "apply_overrides",
    "available",
    "changes",
    "choose_device",
    "load",
    "parse_yaml",
    "section",
    "sections",
    "to_dict",
]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A run's config, parsed once: one typed section per stage, and `raw`, the sections as written (file plus
    overrides; a section or key left out takes its default), which checkpoints and run folders store. Built by
    `load` (a named config or a YAML file) or `RunConfig.parse` (a dict of sections); `override` gives a new one."""

    data: DataConfig
    teacher: TeacherConfig
    trajectories: TrajectoryConfig
    model: ModelConfig
    train: TrainConfig
    raw: dict[str, Any] = dataclasses.field(repr=False, compare=False)

    @classmethod
    def parse(cls, config: RunConfig | dict[str, Any]) -> RunConfig:
        """Every section of the dict `config` built (a RunConfig is returned as it is): an unknown section, key or
        value is a ConfigError naming it."""
        if isinstance(config, RunConfig):
            return config
        check_names(config)
        built = {name: section(config, name, kind) for name, kind in sections().items()}
        return cls(**built, raw=copy.deepcopy(config))

    def given(self, name: str) -> dict[str, Any]:
        """The keys that the config sets in section `name`, as written (the section's other keys are defaults)."""
        return dict(self.raw.get(name) or {})

    def override(self, overrides: list[str]) -> RunConfig:
        """A new RunConfig with `section.key=value` overrides (YAML values) applied to this one's sections."""
        return RunConfig.parse(apply_overrides(self.raw, overrides))


def load(name_or_path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """A named config (see `available()`) or a YAML path, with `a.b=value` overrides (YAML values), parsed."""
    return RunConfig.parse(apply_overrides(read(name_or_path), overrides))
