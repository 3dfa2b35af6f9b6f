"""Experiments that train several models: the paper's ablation (`hkd ablate`), and `trained_model`, the one way a
run is reused when it finished, resumed when it was interrupted, or trained, that `hkd demo` and the ablation share.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hkd.config import apply_overrides, section
from hkd.metrics import METRIC_NOTES, one_step, sample_metrics, teacher_samples, write_table
from hkd.model import HKDModel

ABLATION = (  # name, model.koopman, train.consistency, model.hierarchy, the paper's CIFAR-10 FID
    ("direct regression", False, False, True, 5.72),
    ("Koopman, no trajectory loss", True, False, True, 5.57),
    ("Koopman + trajectory loss, no hierarchy", True, True, False, 4.78),
    ("HKD (all three)", True, True, True, 3.30),
)


def run_folder(config: dict) -> Path:
    """The run folder, train.out."""
    from hkd.train import TrainConfig

    return Path(section(config, "train", TrainConfig).out)


def finished(config: dict) -> bool:
    """Whether the run in train.out finished: its final model/ folder exists."""
    return (run_folder(config) / "model").is_dir()


def trained_model(config: dict, *, dataset=None, device: str | torch.device = "cpu", log=print) -> HKDModel:
    """The EMA model of the run in train.out, in eval mode: the saved one when the run finished (loaded on `device`),
    else the run resumed from its checkpoint, else trained from the start (hkd.train.train, on train.device)."""
    from hkd import train as training

    run = run_folder(config)
    if finished(config):
        return HKDModel.from_pretrained(run / "model", device=device).eval()
    resume = (run / training.CHECKPOINT_NAME).is_file()
    return training.train(config, resume=resume, dataset=dataset, log=log)["ema"].eval()


def ablate(
    config: dict,
    teacher,
    *,
    out_dir: str | Path,
    num: int = 500,
    seed: int = 0,
    dataset=None,
    log=print,
    reference=None,
    inception_weights=None,
):
    """The paper's four ablation configurations, trained with `config` (same data, steps, batch and seed: equal
    budgets) through hkd.train.train, each in out_dir/<name>/ (a finished run is reused, an interrupted one resumed),
    then evaluated on the same noise. `dataset`: trajectories for hkd.train.train (default: train.store).
    `reference`: FID reference images or statistics (needed, and checked before training, for images other than
    the embedded digits). Returns (rows, written files)."""
    out_dir = Path(out_dir)
    shape = (teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
    if reference is None and (shape != (1, 16, 16) or inception_weights is not None):
        raise ValueError(f"the ablation evaluates {shape} images by FID: it needs a reference (images or statistics)")
    noise = torch.randn(num, *shape, generator=torch.Generator().manual_seed(seed))
    endpoint = teacher_samples(teacher, noise, 18)
    rows = []
    for name, koopman, consistency, hierarchy, paper in ABLATION:
        run = out_dir / name.replace(" ", "_").replace(",", "").replace("+", "and").replace("(", "").replace(")", "")
        switches = [f"model.koopman={koopman}", f"model.hierarchy={hierarchy}", f"train.consistency={consistency}"]
        cfg = apply_overrides(config, [*switches, f"train.out={run}"])
        log(f"ablation: {name} ({', '.join(switches)}) -> {run}")
        model = trained_model(cfg, dataset=dataset, device=next(teacher.parameters()).device, log=log)
        row = {"name": name, "evaluations": 1, "koopman": koopman, "trajectory_loss": consistency}
        row["hierarchy"] = hierarchy
        metrics = sample_metrics(
            one_step(model, noise), endpoint, inception_weights=inception_weights, reference=reference
        )
        row.update(metrics)
        rows.append({**row, "paper_fid_cifar10": paper})
    notes = (
        f"Equal budgets: every run uses the same train section ({_budget(config)}); {num} samples, noise seed {seed}. "
        "paper_fid_cifar10: the paper's FID-50k on CIFAR-10 for the same switches (another scale and metric: compare "
        "the ordering, not the values). " + METRIC_NOTES
    )
    return rows, write_table(rows, out_dir, "ablation", "Ablation (the paper's four configurations)", notes)


def _budget(config: dict) -> str:
    train = config.get("train") or {}
    keys = ("epochs", "max_steps", "batch", "lr", "time_samples", "seed")
    return ", ".join(f"{k}={train[k]}" for k in keys if k in train) or "the trainer's defaults"
