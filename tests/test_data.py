"""Embedded digits, image folders, CIFAR-10 from disk only, save_grid, the digits config; their CLI."""

import numpy as np
import pytest
import torch
from PIL import Image

from hkd import config
from hkd.cli import main
from hkd.data import DataConfig, ImageFolder, digits, load_dataset
from hkd.image_grid import save_grid


def test_digits_are_sklearn_digits_in_minus_one_one():
    from sklearn.datasets import load_digits

    raw = load_digits()
    images, labels = digits.load(size=8)
    torch.testing.assert_close(images[:, 0].double(), torch.from_numpy(raw.images) / 8 - 1)
    assert torch.equal(labels, torch.from_numpy(raw.target))
    images16, _ = digits.load()
    assert images16.shape == (1797, 1, 16, 16) and images16.dtype == torch.float32
    assert images16.min() == -1 and images16.max() <= 1 and images16.max() > 0.9
    # upscaling keeps the picture: averaging 2x2 blocks gives back the 8x8 image up to interpolation blur
    down = torch.nn.functional.avg_pool2d(images16, 2)
    assert (down - images).abs().mean() < 0.15


def test_load_dataset_checks_its_section(tmp_path):
    assert len(load_dataset(DataConfig())) == 1797
    with pytest.raises(ValueError, match="channels must be 1"):
        DataConfig(channels=3)  # checked when the section is read, before any work
    with pytest.raises(ValueError, match="needs data.root"):
        DataConfig(name="cifar10", resolution=32, channels=3)
    with pytest.raises(FileNotFoundError, match="CIFAR-10 not found.*never downloads"):
        load_dataset(DataConfig(name="cifar10", resolution=32, channels=3, root=str(tmp_path)))
    with pytest.raises(ValueError, match="unknown data.name"):
        DataConfig(name="mnist")


def test_image_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    colour = torch.randint(0, 256, (3,), dtype=torch.uint8).numpy()
    Image.fromarray(np.broadcast_to(colour, (20, 30, 3)).copy()).save(tmp_path / "sub" / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "b.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    rgb = ImageFolder(tmp_path, resolution=4, channels=3)
    assert len(rgb) == 2
    x = rgb[1]  # sorted: b.jpg, sub/a.png
    assert x.shape == (3, 4, 4)
    torch.testing.assert_close(x, (torch.from_numpy(colour).float() / 127.5 - 1)[:, None, None].expand(3, 4, 4))
    grey = load_dataset(DataConfig(name="folder", resolution=4, channels=1, root=str(tmp_path)))
    assert grey[0].shape == (1, 4, 4) and (grey[0] == -1).all()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolder(tmp_path / "empty", 4)
    with pytest.raises(FileNotFoundError, match="not found"):
        ImageFolder(tmp_path / "missing", 4)


def test_save_grid_round_trip(tmp_path):
    images = torch.rand(5, 1, 3, 2) * 2 - 1
    save_grid(images, tmp_path / "g.png", nrow=2, scale=2, padding=1)
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (2 * (3 * 4 + 1), 2 * (2 * 3 + 1))  # 3 rows x 2 columns of 3x2 images, padding 1, x2
    expected = ((images + 1) * 127.5).round().to(torch.uint8).numpy()
    for i in range(5):
        top, left = 2 * (1 + (i // 2) * 4), 2 * (1 + (i % 2) * 3)
        assert np.array_equal(grid[top : top + 6 : 2, left : left + 4 : 2], expected[i, 0])
    save_grid(torch.rand(2, 3, 4, 4) * 2 - 1, tmp_path / "rgb.png", nrow=8)
    assert Image.open(tmp_path / "rgb.png").mode == "RGB"
    with pytest.raises(ValueError, match="expects images"):
        save_grid(torch.rand(2, 2, 4, 4), tmp_path / "bad.png")


def test_digits_config_sections():
    from hkd.teacher import TeacherConfig
    from hkd.trajectories import TrajectoryConfig

    cfg = config.load("digits")
    assert cfg.data == DataConfig() and isinstance(cfg.teacher, TeacherConfig)
    assert cfg.teacher.channel_mult == (1, 2, 2) and cfg.teacher.sigma_data == 0.5
    trajectories = cfg.trajectories
    assert isinstance(trajectories, TrajectoryConfig)
    assert trajectories.solver() == {
        "sampler": "heun",
        "num_steps": 18,
        "sigma_min": 0.002,
        "sigma_max": 80.0,
        "rho": 7.0,
    }
    assert trajectories.indices() == list(range(19))


def test_cli_train_teacher_trajectories_verify(tmp_path, capsys):
    out, traj = tmp_path / "teacher", tmp_path / "traj"
    tiny = ["teacher.model_channels=4", "teacher.channel_mult=[1]", "teacher.steps=2", "teacher.batch_size=8"]
    assert main(["train-teacher", "--out", str(out), "--device", "cpu", *tiny, "teacher.sample_grid=4"]) == 0
    assert (out / "teacher.pt").is_file() and Image.open(out / "samples.png").size == (4 * 4 * 17 + 4, 4 * 17 + 4)
    args = ["trajectories", "--teacher", str(out), "--out", str(traj), "--num", "5", "--device", "cpu", "--quiet"]
    settings = ["trajectories.num_steps=3", "trajectories.shard_size=2"]
    assert main([*args, *settings, "--max-shards", "2"]) == 0
    assert "2 of 3 shards finished" in capsys.readouterr().out
    assert main(["trajectories", "--verify", str(traj)]) == 2
    assert "shard_00002.npy: not finished" in capsys.readouterr().out
    assert main([*args, *settings]) == 0
    assert main(["trajectories", "--verify", str(traj)]) == 0
    assert "3 shards, 5 trajectories, intact" in capsys.readouterr().out
    # user mistakes: one line, exit 2
    assert main([*args, "trajectories.num_steps=4", "trajectories.shard_size=2"]) == 2
    assert "holds another store" in capsys.readouterr().err
    assert main(["trajectories", "--teacher", str(tmp_path / "none"), "--out", str(traj), "--device", "cpu"]) == 2
    assert main(["trajectories", "--out", str(traj)]) == 2
    assert main(["train-teacher", "--out", str(out), "teacher.bogus=1"]) == 2
    assert "teacher.bogus" in capsys.readouterr().err
