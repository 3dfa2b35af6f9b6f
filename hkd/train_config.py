"""The `train:` section of a run config: HKD's training settings (hkd.train trains with them)."""

from __future__ import annotations

import dataclasses

from hkd.errors import ConfigError
from hkd.losses import PERCEPTUAL
from hkd.sections import Section


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section, name="train"):
    """The `train:` section."""

    out: str = "runs/hkd"  # run folder
    store: str | None = None  # trajectory store folder (hkd trajectories --out)
    teacher: str | None = None  # teacher checkpoint: E and D start as its U-Net (Algorithm 1, step 1); None: random
    online: bool = False  # draw fresh trajectories from the teacher each step instead of reading train.store
    batch: int = 64  # global batch (trajectories per step, all ranks together)
    micro_batch: int | None = None  # trajectories per forward per process; None: batch / world (no accumulation)
    epochs: int = 100
    max_steps: int | None = None  # stop earlier (the schedules still run over `epochs`)
    lr: float = 1e-3
    lr_decay: float = 0.95  # exponential learning-rate decay per epoch
    adam_betas: tuple[float, float] = (0.9, 0.999)
    ema: float = 0.999  # EMA decay per step (0: the EMA is the model)
    grad_clip: float = 1.0  # max global gradient norm (0: off)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 with a GradScaler; bf16/fp16 need a GPU)
    compile: bool = False  # run the model (fused propagation included) under torch.compile
    time_samples: int = 4  # s - 1 intermediate times per trajectory (plus T)
    time_sampling: str = "uniform"  # uniform (t ~ U[eps, T], nearest grid point) | grid (uniform grid index)
    consistency: bool = True  # trajectory-consistency loss; false: only t = T
    perceptual: str = "pseudo_huber"  # lpips | pseudo_huber | none
    lambda1_start: float = 1.0  # MSE weight decays geometrically from start to end over the epochs
    lambda1_end: float = 1e-3
    lambda2: float = 1.0  # weight of the perceptual term
    lambda3: float = 0.0  # latent consistency between sampled times (hkd.losses): the project's addition
    lambda4: float = 0.0  # decoded trajectory: D(exp((t - T) A) E(x_T)) against the teacher's D(x_t; t) (addition)
    lpips_net: str = "alex"
    lpips_weights: str | None = None  # backbone weights file (default: the torch hub cache)
    lpips_resize: int = 224
    on_nonfinite: str = "stop"  # stop | skip: what a NaN/inf loss does
    checkpoint_every: int = 1000
    log_every: int = 10
    sample_every: int = 1000  # 0: only at the end
    sample_count: int = 64
    seed: int = 0
    workers: int = 0  # DataLoader worker processes per rank
    threads: int = 0  # torch CPU threads per process (0: torch's default); 1 is faster on a busy or shared CPU
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True

    def check(self) -> None:
        choices = {
            "precision": ("fp32", "bf16", "fp16"),
            "time_sampling": ("uniform", "grid"),
            "perceptual": PERCEPTUAL,
            "on_nonfinite": ("stop", "skip"),
            "device": ("auto", "cpu", "cuda"),
        }
        for key, valid in choices.items():
            self.require(getattr(self, key) in valid, key, f"one of {', '.join(valid)}")
        for key in ("batch", "epochs", "checkpoint_every", "log_every", "sample_count", "lpips_resize"):
            self.require(getattr(self, key) >= 1, key, ">= 1")
        self.require(self.max_steps is None or self.max_steps >= 1, "max_steps", ">= 1 (or null: all epochs)")
        nonnegative = ("time_samples", "sample_every", "workers", "threads", "grad_clip", "lambda2", "lambda3")
        for key in (*nonnegative, "lambda4", "seed"):
            self.require(getattr(self, key) >= 0, key, ">= 0")
        for key, limit in (("workers", 256), ("threads", 1024), ("seed", 2**63 - 1), ("time_samples", 1000)):
            self.require(getattr(self, key) <= limit, key, f"<= {limit} (hkd's limit)")
        self.require(self.out.strip() != "", "out", "a folder name (empty would write the run into the current folder)")
        intermediate = self.consistency and self.time_samples >= 1
        self.require(self.lambda4 == 0 or intermediate, "lambda4", "0 unless consistency=true and time_samples >= 1")
        self.require(self.lr > 0, "lr", "> 0")
        self.require(0 < self.lr_decay <= 1, "lr_decay", "in (0, 1]")
        self.require(all(0 <= b < 1 for b in self.adam_betas), "adam_betas", "two numbers in [0, 1)")
        self.require(0 <= self.ema < 1, "ema", "in [0, 1)")
        self.require(self.lambda1_start > 0, "lambda1_start", "> 0 (the MSE weight decays geometrically)")
        self.require(self.lambda1_end > 0, "lambda1_end", "> 0 (the MSE weight decays geometrically)")
        accumulation_rounds(self.batch, self.micro_batch, 1)


def accumulation_rounds(batch: int, micro_batch: int | None, world: int) -> int:
    """Micro-batches per step and process: batch / (micro_batch * world) (1 without a micro_batch). A split that
    does not come out even is an error naming the numbers; batch % world is checked where the processes start."""
    if micro_batch is None:
        return 1
    local = batch // world
    if not (1 <= micro_batch <= local and local % micro_batch == 0):
        share = f"the {local} trajectories per process of " if world > 1 else ""
        processes = f" on {world} processes" if world > 1 else ""
        raise ConfigError(f"train.micro_batch = {micro_batch} must divide {share}train.batch = {batch}{processes}")
    return local // micro_batch
