"""Teacher and trajectory-store throughput, one run: teacher training (images/s), store writing with 1 and 2 local
workers (trajectories/s, side by side), and reading the store through a DataLoader (trajectories/s).

    python benchmarks/bench_teacher.py [--config digits] [--steps 30] [--trajectories 400] [--device cpu|cuda]

Training uses the config's teacher section (random initial weights: speed does not depend on them) and reports the
projected time of `teacher.steps`. CPU time is printed next to wall time: on a shared machine the difference is
time spent waiting for a core. Everything is written to a temporary folder and removed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import torch

from hkd import config
from hkd.data import load_dataset
from hkd.edm import edm_loss
from hkd.teacher import _batches, build_net, weights_hash
from hkd.trajectories import TrajectoryDataset, write_store


def clock():
    return time.perf_counter(), time.process_time()


def since(start):
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="digits")
    parser.add_argument("--steps", type=int, default=30, help="training steps timed")
    parser.add_argument("--trajectories", type=int, default=400, help="trajectories written per store")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    cfg = config.load(args.config)
    data, teacher_cfg = cfg.data, cfg.teacher
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}, device {args.device}")

    denoiser = build_net(data, teacher_cfg).to(args.device)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=teacher_cfg.lr)
    batches = _batches(load_dataset(data), teacher_cfg.batch_size, 0, 0)

    def step():
        loss = edm_loss(denoiser, next(batches).to(args.device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm-up
    start = clock()
    for _ in range(args.steps):
        step()
    wall, cpu = since(start)
    rate = args.steps * teacher_cfg.batch_size / wall
    print(
        f"teacher training: {rate:.0f} images/s ({wall / args.steps * 1e3:.0f} ms/step wall, "
        f"{cpu / args.steps * 1e3:.0f} ms/step CPU); {teacher_cfg.steps} steps -> "
        f"{teacher_cfg.steps * wall / args.steps / 60:.1f} min wall, {teacher_cfg.steps * cpu / args.steps / 60:.1f} "
        "min CPU"
    )

    teacher = denoiser.eval().requires_grad_(False)
    teacher.img_channels, teacher.img_resolution = data.channels, data.resolution
    teacher.identity = {"source": "benchmark", "config": {}, "hash": weights_hash(teacher, {})}
    shard = args.trajectories // 4
    traj = dataclasses.replace(
        cfg.trajectories,
        num_trajectories=args.trajectories,
        shard_size=shard,
        batch_size=min(cfg.trajectories.batch_size, shard),
    )
    with tempfile.TemporaryDirectory() as tmp:
        rates = {}
        for workers in (1, 2):
            if workers > 1 and args.device != "cpu":
                continue
            start = clock()
            write_store(teacher, Path(tmp) / f"w{workers}", traj, workers=workers, device=args.device, progress=False)
            wall, _ = since(start)
            rates[workers] = args.trajectories / wall
        print(
            "store writing (Heun, "
            f"{2 * traj.num_steps - 1} evaluations): "
            + ", ".join(f"{w} worker(s) {r:.1f} trajectories/s" for w, r in rates.items())
            + (f"; ratio 2/1 = {rates[2] / rates[1]:.2f}" if 2 in rates else "")
        )
        dataset = TrajectoryDataset(Path(tmp) / "w1", num_times=4)
        loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True)
        start = clock()
        for _ in loader:
            pass
        wall, _ = since(start)
        print(f"store reading (DataLoader, batch 64): {len(dataset) / wall:.0f} trajectories/s")


if __name__ == "__main__":
    main()
