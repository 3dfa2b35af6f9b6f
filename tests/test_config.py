"""hkd.config: a config is parsed once into a frozen RunConfig, each stage gets its section, the dict as written is
what checkpoints store."""

import dataclasses

import pytest
import torch
from test_train import Trajectories
from test_train import config as train_config

from hkd import config, files, sections, train
from hkd.config import ConfigError, RunConfig
from hkd.data import DataConfig
from hkd.model import ModelConfig
from hkd.teacher import TeacherConfig, build_net, train_teacher
from hkd.train_config import TrainConfig
from hkd.trajectories import TrajectoryConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def test_load_parses_every_section_once_into_frozen_typed_sections():
    cfg = config.load("digits", ["train.lr=1e-4", "model.channel_mult=[1, 2]"])
    kinds = {"data": DataConfig, "teacher": TeacherConfig, "trajectories": TrajectoryConfig}
    kinds |= {"model": ModelConfig, "train": TrainConfig}
    assert [f.name for f in dataclasses.fields(RunConfig) if f.name != "raw"] == list(kinds)
    for name, kind in kinds.items():  # each section as hkd.sections.section builds it from the dict as written
        assert getattr(cfg, name) == sections.section(cfg.raw, name, kind) and type(getattr(cfg, name)) is kind
    assert cfg.train.lr == 1e-4 and cfg.model.channel_mult == (1, 2) and cfg.raw["model"]["channel_mult"] == [1, 2]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0


def test_parse_copies_the_dict_and_override_gives_a_new_config():
    raw = {"train": {"lr": 0.5, "out": "somewhere"}, "model": {"clock": "log"}}
    cfg = RunConfig.parse(raw)
    assert RunConfig.parse(cfg) is cfg and cfg.raw == raw
    raw["train"]["lr"] = 0.25  # the caller's dict is not the config's
    assert cfg.train.lr == 0.5 and cfg.raw["train"]["lr"] == 0.5
    assert cfg.given("train") == {"lr": 0.5, "out": "somewhere"} and cfg.given("data") == {}
    other = cfg.override(["train.lr=0.1", "data.resolution=8"])
    assert (other.train.lr, other.data.resolution, other.model.clock) == (0.1, 8, "log")
    assert (cfg.train.lr, cfg.data.resolution, "data" in cfg.raw) == (0.5, 16, False)
    assert other.raw == {"train": {"lr": 0.1, "out": "somewhere"}, "model": {"clock": "log"}, "data": {"resolution": 8}}


def test_errors_name_the_section_and_key_in_the_pipeline_order():
    expected = "unknown config section 'trian' (did you mean train?); valid: data, teacher, trajectories, model, train"
    with pytest.raises(ConfigError) as error:
        config.load("digits", ["trian.batch=8"])
    assert str(error.value) == expected
    with pytest.raises(ConfigError) as error:
        RunConfig.parse({"trian": {}})
    assert str(error.value) == expected
    with pytest.raises(ConfigError, match=r"^unknown key train.bacth \(did you mean train.batch\?\); valid: out, "):
        RunConfig.parse({"train": {"bacth": 4}})
    with pytest.raises(ConfigError, match=r"^model.clock must be one of identity, log, got 'lin'$"):
        config.load("digits").override(["model.clock=lin"])
    with pytest.raises(TypeError, match="config.data and config.teacher"):
        train_teacher({"data": {}}, {"teacher": {}}, "never-written")


def test_train_stores_the_dict_as_written_for_a_dict_and_a_run_config(tmp_path):
    data = Trajectories(count=16)
    written = {}
    for name in ("dict", "parsed"):
        raw = train_config(tmp_path, name, max_steps=1, seed=1)
        train.train(raw if name == "dict" else RunConfig.parse(raw), dataset=data)
        written[name] = (raw, files.load(tmp_path / name / "checkpoint.pt")["config"])
    for raw, saved in written.values():
        assert saved == raw and list(saved["train"]) == list(raw["train"])  # as written: no defaults, same order


def test_build_model_takes_the_sizes_the_section_leaves_out_from_the_teacher():
    teacher = build_net(DataConfig(resolution=8), TeacherConfig(model_channels=8, channel_mult=(1, 2)))
    model = train.build_model(ModelConfig(clock="log"), teacher, {"clock": "log"})
    assert model.config.clock == "log" and model.config.model_channels == 8 and model.config.img_resolution == 8
    assert train.build_model(ModelConfig(), teacher, {}).config.clock == "identity"
    for name, tensor in model.net.state_dict().items():  # encoder and decoder start as the teacher's U-Net
        torch.testing.assert_close(tensor, teacher.net.state_dict()[name], rtol=0, atol=0, msg=name)
    with pytest.raises(ConfigError, match="does not match the teacher"):
        train.build_model(ModelConfig(model_channels=16), teacher, {"model_channels": 16})
