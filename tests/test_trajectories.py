"""Trajectory store: endpoint == last state, 1 worker == 2 workers, kill + resume == uninterrupted, verify, dataset."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from hkd import trajectories
from hkd.edm import EDMPrecond, heun_sampler
from hkd.teacher import weights_hash
from hkd.trajectories import CorruptShardError, TrajectoryConfig, TrajectoryDataset, verify_store, write_store


class TinyNet(nn.Module):
    """Any network with the U-Net's forward(x, noise_labels) signature: keeps the store tests fast."""

    def __init__(self, channels=1):
        super().__init__()
        self.conv0 = nn.Conv2d(channels + 1, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, channels, 3, padding=1)

    def forward(self, x, noise_labels):
        label = noise_labels.reshape(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return self.conv1(torch.tanh(self.conv0(torch.cat([x, label], dim=1))))


def tiny_teacher(channels=1, resolution=8):
    denoiser = EDMPrecond(TinyNet(channels)).eval().requires_grad_(False)
    denoiser.img_channels, denoiser.img_resolution = channels, resolution
    denoiser.identity = {"source": "test", "config": {}, "hash": weights_hash(denoiser, {})}
    return denoiser


CFG = TrajectoryConfig(num_trajectories=10, num_steps=4, state_indices=(2,), shard_size=4, batch_size=3, seed=5)


def shards(store_dir):
    return {p.name: p.read_bytes() for p in sorted(store_dir.glob("shard_*.npy"))}


def test_states_are_the_heun_trajectories_and_endpoint_is_last_state(tmp_path):
    teacher = tiny_teacher()
    manifest = write_store(teacher, tmp_path, CFG, progress=False)
    assert manifest["num_shards"] == 3 and sorted(manifest["shards"]) == list(shards(tmp_path))
    assert manifest["state_indices"] == [0, 2, 4] and manifest["dtype"] == "float16"
    assert manifest["teacher"]["hash"] == teacher.identity["hash"] and manifest["seed_range"] == [0, 10]
    assert manifest["bytes_per_trajectory"] == 3 * 64 * 2

    dataset = TrajectoryDataset(tmp_path, num_times=3)
    assert len(dataset) == 10
    for i in (0, 5, 9):  # shards of 4, 4 and 2 trajectories
        noise = trajectories.trajectory_noise(CFG.seed, i, (1, 8, 8))[None]
        times, states = heun_sampler(teacher, noise, num_steps=4)
        item = dataset[i]
        assert item["index"] == i
        torch.testing.assert_close(item["x_eps"], states[-1, 0].float(), rtol=2e-3, atol=2e-3)  # float16 storage
        torch.testing.assert_close(item["states"], states[[0, 2, 4], 0].float(), rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(item["x_T"], 80 * noise[0], rtol=2e-3, atol=0)
        torch.testing.assert_close(item["times"], times[[0, 2, 4]].float())
        assert item["x_t"].shape == (3, 1, 8, 8) and set(item["t"].tolist()) <= {times[2].float().item()}


def test_one_worker_equals_two_workers(tmp_path):
    teacher = tiny_teacher()
    write_store(teacher, tmp_path / "one", CFG, progress=False)
    write_store(teacher, tmp_path / "two", CFG, workers=2, progress=False)
    assert shards(tmp_path / "one") == shards(tmp_path / "two")
    one, two = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two"))
    assert one["shards"] == two["shards"]


def test_torchrun_ranks_write_disjoint_shards(tmp_path, monkeypatch):
    teacher = tiny_teacher()
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        manifest = write_store(teacher, tmp_path / "ranks", CFG, progress=False)
        assert {int(n[6:11]) % 2 for n in manifest["shards"]} == ({1} if rank == 1 else {0, 1})
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    write_store(teacher, tmp_path / "single", CFG, progress=False)
    assert shards(tmp_path / "ranks") == shards(tmp_path / "single")


def test_kill_midway_and_resume_equals_uninterrupted(tmp_path, monkeypatch):
    teacher = tiny_teacher()
    write_store(teacher, tmp_path / "straight", CFG, progress=False)

    # killed in the middle of shard 1 (the sampler's 3rd batch: shard 0 has batches of 3 + 1)
    calls = {"n": 0}

    def dying_sampler(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed")
        return heun_sampler(*args, **kwargs)

    monkeypatch.setattr(trajectories, "heun_sampler", dying_sampler)
    with pytest.raises(KeyboardInterrupt):
        write_store(teacher, tmp_path / "resumed", CFG, progress=False)
    monkeypatch.setattr(trajectories, "heun_sampler", heun_sampler)
    assert list(shards(tmp_path / "resumed")) == ["shard_00000.npy"]  # no partial shard looks complete
    assert trajectories.read_manifest(tmp_path / "resumed")["shards"].keys() == {"shard_00000.npy"}
    assert verify_store(tmp_path / "resumed") == [
        f"shard_0000{k}.npy: not finished (run `hkd trajectories` again to complete the store)" for k in (1, 2)
    ]
    # leftovers of a harder kill: a temporary file, and a renamed shard the manifest never recorded
    (tmp_path / "resumed" / ".shard_00001.npy.999.tmp").write_bytes(b"partial")
    (tmp_path / "resumed" / "shard_00002.npy").write_bytes(b"garbage")
    first = (tmp_path / "resumed" / "shard_00000.npy").stat().st_mtime_ns

    write_store(teacher, tmp_path / "resumed", CFG, progress=False)
    assert (tmp_path / "resumed" / "shard_00000.npy").stat().st_mtime_ns == first  # finished shards are skipped
    assert shards(tmp_path / "resumed") == shards(tmp_path / "straight")
    assert not list((tmp_path / "resumed").glob("*.tmp"))
    assert verify_store(tmp_path / "resumed") == []

    # max_shards: a time-limited job writes some shards and stops; the next run completes
    manifest = write_store(teacher, tmp_path / "limited", CFG, max_shards=1, progress=False)
    assert len(manifest["shards"]) == 1
    write_store(teacher, tmp_path / "limited", CFG, progress=False)
    assert shards(tmp_path / "limited") == shards(tmp_path / "straight")


def test_verify_and_dataset_name_corrupt_shards(tmp_path):
    write_store(tiny_teacher(), tmp_path, CFG, progress=False)
    assert verify_store(tmp_path) == []
    path = tmp_path / "shard_00001.npy"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    problems = verify_store(tmp_path)
    assert len(problems) == 1 and problems[0].startswith("shard_00001.npy: ") and "truncated" in problems[0]
    with pytest.raises(CorruptShardError, match="shard_00001.npy.*truncated.*--verify"):
        TrajectoryDataset(tmp_path)  # training checks the store when it opens it
    dataset = TrajectoryDataset(tmp_path, verify=False)
    dataset[0]
    with pytest.raises(CorruptShardError, match="shard_00001.npy"):
        dataset[4]
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF
    path.write_bytes(bytes(flipped))  # same size, other bytes
    assert verify_store(tmp_path) == ["shard_00001.npy: checksum differs from the manifest's (modified or corrupt)"]
    with pytest.raises(CorruptShardError, match="shard_00001.npy: checksum differs"):
        TrajectoryDataset(tmp_path)


def test_store_refuses_other_teacher_or_settings(tmp_path):
    teacher = tiny_teacher()
    write_store(teacher, tmp_path, CFG, progress=False)
    with pytest.raises(ValueError, match="teacher"):
        write_store(tiny_teacher(), tmp_path, CFG, progress=False)  # other weights
    other = TrajectoryConfig(**{**CFG.__dict__, "num_steps": 6})
    with pytest.raises(ValueError, match="solver"):
        write_store(teacher, tmp_path, other, progress=False)
    # batch size is not content: a resume may use another one
    write_store(teacher, tmp_path, TrajectoryConfig(**{**CFG.__dict__, "batch_size": 2}), progress=False)

    expect = trajectories.expectation(CFG, teacher.identity["hash"], (1, 8, 8))
    assert len(TrajectoryDataset(tmp_path, expect=expect)) == 10
    with pytest.raises(ValueError, match="teacher.hash is '.*' in the store"):
        TrajectoryDataset(tmp_path, expect=trajectories.expectation(CFG, "0" * 64))
    with pytest.raises(ValueError, match="solver.num_steps is 4 in the store, 6 expected"):
        TrajectoryDataset(tmp_path, expect=trajectories.expectation(other))
    with pytest.raises(FileNotFoundError, match="no trajectory store"):
        TrajectoryDataset(tmp_path / "nowhere")


def test_unfinished_store_and_stateless_grid(tmp_path):
    teacher = tiny_teacher()
    write_store(teacher, tmp_path, CFG, max_shards=2, progress=False)
    with pytest.raises(ValueError, match="unfinished .2 of 3 shards"):
        TrajectoryDataset(tmp_path)
    assert len(TrajectoryDataset(tmp_path, allow_partial=True)) == 8
    ends_only = TrajectoryConfig(**{**CFG.__dict__, "state_indices": ()})
    write_store(teacher, tmp_path / "ends", ends_only, progress=False)
    assert TrajectoryDataset(tmp_path / "ends")[3]["states"].shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="no state between x_T and x_eps"):
        TrajectoryDataset(tmp_path / "ends", num_times=2)
    with pytest.raises(ValueError, match="outside the solver's grid"):
        TrajectoryConfig(num_steps=4, state_indices=(7,)).indices()


def test_dataset_with_distributed_sampler_and_workers(tmp_path):
    write_store(tiny_teacher(), tmp_path, CFG, progress=False)
    dataset = TrajectoryDataset(tmp_path, num_times=2)
    seen = []
    for rank in range(2):
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=1)
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, sampler=sampler, num_workers=1)
        for batch in loader:
            assert batch["states"].shape[1:] == (3, 1, 8, 8) and batch["x_t"].shape[1:] == (2, 1, 8, 8)
            assert batch["states"].dtype == torch.float32
            seen += batch["index"].tolist()
    assert sorted(seen) == list(range(10))


def test_online_mode_draws_the_store_trajectories(tmp_path):
    teacher = tiny_teacher()
    write_store(teacher, tmp_path, CFG, progress=False)
    dataset = TrajectoryDataset(tmp_path)
    online = trajectories.OnlineTrajectories(teacher, CFG, num_times=2, rank=1, world_size=2)
    first, second = online.draw(2), online.draw(2)
    assert first["index"].tolist() == [1, 3] and second["index"].tolist() == [5, 7] and online.next_index == 4
    for batch in (first, second):
        for row, i in enumerate(batch["index"].tolist()):
            torch.testing.assert_close(batch["states"][row], dataset[i]["states"], rtol=2e-3, atol=2e-3)
            # x_t is one of the stored intermediate states, at its time
            k = (batch["times"][row] == batch["t"][row, 0]).nonzero().item()
            assert 0 < k < 2 and torch.equal(batch["x_t"][row, 0], batch["states"][row, k])


def test_stored_noise_depends_only_on_seed_and_index():
    a = trajectories.trajectory_noise(3, 17, (1, 4, 4))
    assert torch.equal(a, trajectories.trajectory_noise(3, 17, (1, 4, 4)))
    assert not torch.equal(a, trajectories.trajectory_noise(3, 18, (1, 4, 4)))
    assert not torch.equal(a, trajectories.trajectory_noise(4, 17, (1, 4, 4)))
    assert np.isclose(trajectories.trajectory_noise(0, 0, (64, 64, 4)).std().item(), 1, atol=0.05)
