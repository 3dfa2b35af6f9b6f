"""Experiments that train several models: the paper's ablation (`hkd ablate`), the learning curve (one-step quality
against training steps), and `trained_model`, the one way a run is reused when it finished, resumed when it was
interrupted, or trained, that `hkd demo` and the ablation share.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hkd.config import RunConfig
from hkd.evaluation import one_step, sample_metrics, teacher_samples, write_table
from hkd.model import HKDModel

if TYPE_CHECKING:
    from hkd.train_config import TrainConfig

ABLATION = (  # name, model.koopman, train.consistency, model.hierarchy, the paper's CIFAR-10 FID
    ("direct regression", False, False, True, 5.72),
    ("Koopman, no trajectory loss", True, False, True, 5.57),
    ("Koopman + trajectory loss, no hierarchy", True, True, False, 4.78),
    ("HKD (all three)", True, True, True, 3.30),
)


def finished(cfg: TrainConfig) -> bool:
    """Whether the run in train.out finished: its final model/ folder exists."""
    return (Path(cfg.out) / "model").is_dir()


def trained_model(config: RunConfig | dict, *, dataset=None, device: str | torch.device = "cpu", log=print) -> HKDModel:
    """The EMA model of the run in train.out, in eval mode: the saved one when the run finished (loaded on `device`),
    else the run resumed from its checkpoint, else trained from the start (hkd.train.train, on train.device).
    `config`: a RunConfig, or a dict of sections (parsed here)."""
    from hkd import train as training

    config = RunConfig.parse(config)
    run = Path(config.train.out)
    if finished(config.train):
        return HKDModel.from_pretrained(run / "model", device=device).eval()
    resume = (run / training.CHECKPOINT_NAME).is_file()
    return training.train(config, resume=resume, dataset=dataset, log=log)["ema"].eval()


def forward_passes(cfg: TrainConfig, steps: int) -> int:
    """(x_t, t) forward passes of `steps` optimiser steps: batch * s per step with the trajectory loss (s - 1
    intermediate times + T), batch without it. The budget that makes HKD and direct regression comparable."""
    return steps * cfg.batch * (cfg.time_samples + 1 if cfg.consistency else 1)


def run_steps(cfg: TrainConfig) -> int:
    """The optimiser steps the run in train.out has taken (its checkpoint's), 0 before the first."""
    from hkd import files
    from hkd.train import CHECKPOINT_NAME

    path = Path(cfg.out) / CHECKPOINT_NAME
    return int(files.load(path)["step"]) if path.is_file() else 0


def milestones(total: int) -> list[int]:
    """The learning curve's stops: a sixth, a third, a half, two thirds and all of a run's `total` steps."""
    return sorted({max(1, round(total * f)) for f in (1 / 6, 1 / 3, 1 / 2, 2 / 3, 1)})


def curve_inputs(config: RunConfig, teacher, *, num: int = 500, held_out: int = 64, device="cpu") -> dict:
    """What a run's learning curve is measured on (learning_curve's keywords): the milestones of its training,
    `num` noises (seed 0) with the teacher's 18-step Heun endpoints for them, and `held_out` fresh teacher
    trajectories (seed 1) with the teacher, for the faithfulness of the Koopman trajectory."""
    from hkd.faithfulness import teacher_trajectories
    from hkd.train import total_steps

    train = config.train
    per_epoch = config.trajectories.num_trajectories // train.batch
    shape = (num, teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    return dict(
        milestones=milestones(total_steps(train.epochs, per_epoch, train.max_steps)),
        noise=noise,
        endpoint=teacher_samples(teacher, noise, 18),
        trajectories=(*teacher_trajectories(teacher, held_out), teacher),
    )


def learning_curve(
    config: RunConfig,
    milestones: list[int],
    noise: torch.Tensor,
    endpoint: torch.Tensor,
    *,
    trajectories: tuple | None = None,
    device="cpu",
    log=print,
) -> tuple[HKDModel, list[dict]]:
    """Train the run in train.out in stages, stopping at each of `milestones` (optimiser steps; train.max_steps, so
    the schedules still run over train.epochs), and evaluate the EMA one-step model there on `noise` against the
    teacher's `endpoint` for the same noise. With `trajectories` = (times, states, teacher) (held-out, as
    hkd.faithfulness.teacher_trajectories returns them), each row also holds hkd.faithfulness.summary there: how
    far the Koopman trajectory follows the teacher's as training goes on. The rows (step, forward_passes, metrics)
    are kept in train.out/curve.json as they come, so an interrupted curve resumes. The last milestone is the run's
    total (train.epochs or train.max_steps). Returns (the final EMA model, the rows)."""
    from hkd import faithfulness
    from hkd import train as training
    from hkd.figures import write_json

    run = Path(config.train.out)
    path = run / "curve.json"
    rows = json.loads(path.read_text()) if path.is_file() else []
    model = None
    for k in sorted(set(milestones)):
        step = run_steps(config.train)
        if any(row["step"] == k for row in rows) or step > k:
            continue  # measured earlier, or passed (the model at k is gone)
        if step == k and finished(config.train):  # stopped at k earlier, before its row was written
            model = HKDModel.from_pretrained(run / "model", device=device).eval()
        else:
            staged = config.override([f"train.max_steps={k}"])
            model = training.train(staged, resume=step > 0, log=log)["ema"].eval()
        metrics = sample_metrics(one_step(model, noise), endpoint)
        if trajectories is not None:
            metrics |= faithfulness.summary(faithfulness.measure(model, *trajectories))
        rows.append({"step": k, "forward_passes": forward_passes(config.train, k), **metrics})
        write_json(path, rows)
    return model if model is not None else trained_model(config, device=device, log=log), rows


def curve_table(curves: dict[str, list[dict]], out_dir: str | Path, metric: str = "fd_digits") -> list[Path]:
    """curve.md, curve.json and curve.png in out_dir: `metric` against optimiser steps and against (x_t, t) forward
    passes, one series per named run."""
    from hkd import figures

    out_dir = Path(out_dir)
    rows_all = [row for rows in curves.values() for row in rows]
    trajectory = any("relative_mean" in row for row in rows_all)  # learning_curve measured the trajectory too
    columns = ["run", "step", "forward_passes", metric, "mse", "feature_distance"]
    columns += ["relative_mean", "decoded_mse_mean"] if trajectory else []
    table = [[name, *(row.get(c, float("nan")) for c in columns[1:])] for name, rows in curves.items() for row in rows]
    text = (
        "# Learning curve\n\nOne-step samples of each run's EMA model at its milestones (the same noise), against "
        "the teacher's 35-evaluation endpoint for that noise (mse, feature_distance). Forward passes count the "
        "(x_t, t) pairs the run's encoder has seen: HKD sees s times per trajectory, direct regression one."
        + (
            " relative_mean: the latent consistency r_A / r_0 over t on held-out teacher trajectories (below 1: the "
            "evolution follows the teacher's latents better than standing still; 1 for direct regression, whose "
            "evolution is the identity); decoded_mse_mean: the decoded Koopman state against the teacher's "
            "denoised estimate (hkd.faithfulness)."
            if trajectory
            else ""
        )
        + "\n\n"
        + figures.markdown_table(columns, table)
    )
    fig, axes = figures.plt.subplots(1, 3 if trajectory else 2, figsize=(15 if trajectory else 10, 3.8))
    for name, rows in curves.items():
        for ax, x in zip(axes, ("step", "forward_passes"), strict=False):
            ax.plot([r[x] for r in rows], [r[metric] for r in rows], marker="o", label=name)
            ax.set_xlabel(x.replace("_", " "))
            ax.set_ylabel(metric)
        if trajectory:
            axes[2].plot([r["step"] for r in rows], [r.get("relative_mean", float("nan")) for r in rows], marker="o",
                         label=name)  # fmt: skip
    if trajectory:
        axes[2].axhline(1.0, color="grey", lw=0.8)
        axes[2].set_xlabel("step")
        axes[2].set_ylabel("latent consistency r_A / r_0 (mean over t)")
    for ax in axes:
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    return [
        figures.atomic_write(out_dir / "curve.md", text + "\n"),
        figures.write_json(out_dir / "curve.json", curves),
        figures.save_figure(fig, out_dir / "curve.png"),
    ]


def ablate(
    config: RunConfig | dict,
    teacher,
    *,
    out_dir: str | Path,
    num: int = 500,
    seed: int = 0,
    dataset=None,
    log=print,
    reference=None,
    inception_weights=None,
    folders: dict[str, str | Path] | None = None,
):
    """The paper's four ablation configurations, trained with `config` (a RunConfig, or a dict of sections parsed
    here; same data, steps, batch and seed: equal budgets) through hkd.train.train, each in out_dir/<name>/ (a
    finished run is reused, an interrupted one resumed), then evaluated on the same noise. `dataset`: trajectories
    for hkd.train.train (default: train.store). `reference`: FID reference images or statistics (needed, and checked
    before training, for images without a feature space in hkd.feature_space). `folders`: run folders by ablation
    name for runs made elsewhere with the same settings (hkd demo passes its HKD and baseline runs). Each row states
    its budget: optimiser steps and (x_t, t) forward passes (the runs without the trajectory loss see one time per
    trajectory, the others s). Returns (rows, written files)."""
    config, out_dir = RunConfig.parse(config), Path(out_dir)
    shape = (teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
    from hkd.feature_space import space_for

    if reference is None and (space_for(shape) is None or inception_weights is not None):
        raise ValueError(f"the ablation evaluates {shape} images by FID: it needs a reference (images or statistics)")
    noise = torch.randn(num, *shape, generator=torch.Generator().manual_seed(seed))
    endpoint = teacher_samples(teacher, noise, 18)
    rows = []
    for name, koopman, consistency, hierarchy, paper in ABLATION:
        run = out_dir / name.replace(" ", "_").replace(",", "").replace("+", "and").replace("(", "").replace(")", "")
        run = Path((folders or {}).get(name, run))
        switches = [f"model.koopman={koopman}", f"model.hierarchy={hierarchy}", f"train.consistency={consistency}"]
        cfg = config.override([*switches, f"train.out={run}"])
        log(f"ablation: {name} ({', '.join(switches)}) -> {run}")
        model = trained_model(cfg, dataset=dataset, device=next(teacher.parameters()).device, log=log)
        row = {"name": name, "evaluations": 1, "koopman": koopman, "trajectory_loss": consistency}
        row["hierarchy"] = hierarchy
        row["steps"] = run_steps(cfg.train)
        row["forward_passes"] = forward_passes(cfg.train, row["steps"])
        metrics = sample_metrics(
            one_step(model, noise), endpoint, inception_weights=inception_weights, reference=reference
        )
        row.update(metrics)
        rows.append({**row, "paper_fid_cifar10": paper})
    notes = (
        f"Equal steps: every run uses the same train section ({_budget(config)}); the forward passes differ (one "
        f"(x_t, t) per trajectory without the trajectory loss, s with it). {num} samples, noise seed {seed}. "
        "paper_fid_cifar10: the paper's FID-50k on CIFAR-10 for the same switches (another scale and metric: compare "
        "the ordering, not the values)."
    )
    return rows, write_table(rows, out_dir, "ablation", "Ablation (the paper's four configurations)", notes)


def _budget(config: RunConfig) -> str:
    train = config.given("train")
    keys = ("epochs", "max_steps", "batch", "lr", "time_samples", "seed")
    return ", ".join(f"{k}={train[k]}" for k in keys if k in train) or "the trainer's defaults"
