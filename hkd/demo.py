"""`hkd demo`: from a clone to a trained one-step generator, its evaluation, its spectrum and an edit, on an
embedded dataset (`--config digits`, the default, or `photos`), with no data or weights of the user's own.

Stages (each skipped when its result exists, unless fresh=True), all under one folder:
  teacher/       EDM teacher trained on the config's data (hkd.teacher.train_teacher)
  trajectories/  its PF-ODE trajectories (hkd.trajectories.write_store)
  hkd/           HKD trained on them (Algorithm 1, hkd.train.train)
  baseline/      the direct one-step regression baseline: the same run with koopman=false, consistency=false
  samples.png    teacher (35 evaluations), HKD and the baseline (one each) from the same noise, side by side
  curve/         the learning curve: one-step quality of HKD and the baseline at milestones of their training
  eval/          the table: teacher at 35 and 3 evaluations, HKD one step, the baseline (hkd.evaluation.evaluate)
  analysis/      eigenvalues, band decodes, cumulative effect, power spectra (hkd.analysis.analyze)
  edit/          frequency-targeted editing, inpainting, colourisation (hkd.editing.run)
  ablation/      with --quality: the paper's four configurations at the same budget
                 (hkd.experiments.ablate)
  report.md      everything above on one page
  .hkd-demo      the marker that says hkd made the folder: `--fresh` deletes only a folder that holds it
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from hkd import config as configs
from hkd.errors import UserError
from hkd.files import LOCK_NAME, atomic_write, output_folder, run_lock

MARKER = ".hkd-demo"

# The demo's scale on top of hkd/configs/digits.yaml: 30 epochs over 2000 trajectories (930 steps), within which the
# one-step samples converge (the learning curves are in benchmarks/RESULTS.md).
DEMO = [
    "trajectories.num_trajectories=2000",
    "trajectories.shard_size=500",
    "train.epochs=30",
    "train.sample_every=0",
    "train.checkpoint_every=100",
]
# --quality: HKD and the baseline three times longer (90 epochs, 2790 steps), and the ablation's two other runs at
# that budget: about 70 minutes on 2 idle CPU cores, estimated from the plain demo's stage times (unmeasured with the
# latent consistency term).
QUALITY = ["train.epochs=90"]
# --quick: a smoke run of every stage (under a minute on 2 CPU cores); the numbers mean nothing.
QUICK = [
    "teacher.steps=150",
    "teacher.checkpoint_every=150",
    "teacher.log_every=50",
    "trajectories.num_trajectories=128",
    "trajectories.shard_size=64",
    "trajectories.batch_size=64",
    "train.batch=32",
    "train.epochs=1",
    "train.max_steps=30",
    "train.log_every=10",
    "train.sample_count=16",
]


# Each embedded config's demo: (title, the data in one sentence, its scale on top of DEMO, whether the plain demo
# runs the ablation). The photos' budget, 15 epochs (465 steps), keeps the plain demo within 20 minutes on 2 idle
# CPU cores; the ablation's two other runs at that budget do not fit beside it (one of them costs as much as HKD),
# so the photos, like the digits, run the ablation with --quality (benchmarks/RESULTS.md has it at this budget).
CONFIGS = {
    "digits": (
        "the embedded digits",
        "Teacher: EDM on scikit-learn's 8x8 digits upscaled to 16x16.",
        [],
        False,
    ),
    "photos": (
        "natural colour images",
        "Teacher: EDM on 16x16 RGB patches of scikit-image's bundled colour photographs (hkd.data.photos); the "
        "inpainting and the colourisation start from patches of held-out columns of the same photos.",
        ["train.epochs=15"],
        False,
    ),
}


def settings(
    out: Path, quick: bool, overrides: list[str] = (), quality: bool = False, name: str = "digits"
) -> configs.RunConfig:
    paths = [
        f"train.out={out / 'hkd'}",
        f"train.store={out / 'trajectories'}",
        f"train.teacher={out / 'teacher' / 'teacher.pt'}",
    ]
    scale = [*CONFIGS[name][2], *(QUICK if quick else []), *(QUALITY if quality else [])]
    return configs.load(name, [*DEMO, *scale, *paths, *overrides])


def claim(out: Path, fresh: bool) -> None:
    """Make `out` (locked by the caller) the demo's folder. A new or empty folder gets the marker. With fresh, the
    contents of a folder that holds the marker are deleted; any other folder is refused, never deleted."""
    contents = [p for p in out.iterdir() if p.name != LOCK_NAME]
    marked = (out / MARKER).is_file()
    if fresh and contents:
        if not marked:
            raise UserError(
                f"--fresh: {out} was not made by `hkd demo` (no {MARKER} file in it), so it is not deleted; "
                "choose another --out or empty it yourself"
            )
        for path in contents:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        contents = []
    if not contents:
        atomic_write(out / MARKER, "made by `hkd demo`: `hkd demo --fresh` deletes this folder's contents\n")


def run(
    out: str | Path = "runs/demo",
    *,
    quick: bool = False,
    quality: bool = False,
    fresh: bool = False,
    device: str = "auto",
    overrides: list[str] = (),
    config: str = "digits",
    log=print,
) -> Path:
    """Run (or finish) every stage in `out`; returns the path of report.md. `out` is locked for the run: a second
    demo into the same folder is refused. quality: the longer preset with the ablation (see QUALITY). config: which
    embedded dataset's config (CONFIGS)."""
    out = Path(out)
    if quick and quality:
        raise UserError("--quick and --quality: choose one")
    if config not in CONFIGS:
        raise UserError(f"--config {config!r}: the demo runs on {' or '.join(CONFIGS)}")
    name = config
    if name == "photos":  # scikit-image (hkd[photos]) before any work
        from hkd.data.photos import data_dir

        data_dir()
    config = settings(out, quick, list(overrides), quality, name)
    device = configs.choose_device(device, "--device")
    config = config.override([f"train.device={device.type}"])
    if out.is_symlink():
        raise UserError(f"--out {out} is a symbolic link: give the folder itself")
    if fresh and out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        claim(out, fresh)  # refuses, before the lock file is written into someone else's folder
    with run_lock(output_folder(out, "--out")):
        claim(out, fresh)
        return _stages(out, config, device, quick, quality, log, name)


def _stages(
    out: Path, config: configs.RunConfig, device: torch.device, quick: bool, quality: bool, log, name: str
) -> Path:
    from hkd import analysis, editing, experiments, feature_space, files
    from hkd.data import examples
    from hkd.figures import write_json
    from hkd.teacher import CHECKPOINT_NAME, load_teacher, train_teacher
    from hkd.trajectories import read_manifest, write_store

    timings_file = out / "timings.json"  # seconds per stage, kept across re-runs for the report
    try:
        timings: dict[str, float] = json.loads(timings_file.read_text())
    except (OSError, ValueError):  # none yet (or unreadable): the report then lists fewer times
        timings = {}

    def stage(name: str, done: bool, work):
        """work()'s result, timed; None, without running it, when the stage was done earlier."""
        if done:
            log(f"[demo] {name}: done earlier, skipped (--fresh redoes it)")
            return None
        log(f"[demo] {name} ...")
        start = time.perf_counter()
        result = work()
        timings[name] = time.perf_counter() - start
        write_json(timings_file, timings)
        log(f"[demo] {name}: {timings[name]:.0f} s")
        return result

    data = config.data
    if name == "photos":
        feature_space.use_photos(data.resolution)
    space = feature_space.space_for((data.channels, data.resolution, data.resolution))
    teacher_ckpt = out / "teacher" / CHECKPOINT_NAME
    steps = config.teacher.steps

    def teacher_done() -> bool:
        return teacher_ckpt.is_file() and files.load(teacher_ckpt)["step"] >= steps

    resume = teacher_ckpt.is_file()
    stage(
        "1/8 teacher",
        teacher_done(),
        lambda: train_teacher(data, config.teacher, out / "teacher", resume=resume, device=device, log=log),
    )
    teacher = load_teacher(teacher_ckpt, device=device)

    store = out / "trajectories"

    def store_done() -> bool:
        if not (store / "manifest.json").is_file():
            return False
        manifest = read_manifest(store)
        return len(manifest["shards"]) == manifest["num_shards"]

    workers = 2 if device.type == "cpu" else 1
    stage(
        "2/8 trajectories",
        store_done(),
        lambda: write_store(teacher, store, config.trajectories, workers=workers, device=device),
    )

    # Learning curves: each run stops at milestones; its one-step samples (500 noises) and its Koopman trajectory
    # (64 held-out teacher trajectories; 128 and 16 with --quick) are measured there.
    num = 128 if quick else 500
    measured_on = experiments.curve_inputs(config, teacher, num=num, held_out=16 if quick else 64, device=device)
    total = measured_on["milestones"][-1]
    curves = {}

    def trained(label: str, name: str, switches: list[str]):
        """One run as a stage, trained (or resumed) through its learning curve, or reused when done earlier."""
        cfg = config.override([*switches, f"train.out={out / name}"])
        done = experiments.finished(cfg.train) and experiments.run_steps(cfg.train) >= total
        work = lambda: experiments.learning_curve(cfg, **measured_on, device=device, log=log)  # noqa: E731
        model, curves[label.split(" ", 1)[1]] = stage(label, done, work) or work()
        return model

    model = trained("3/8 HKD", "hkd", [])
    baseline = trained("4/8 direct regression", "baseline", ["model.koopman=false", "train.consistency=false"])
    experiments.curve_table(curves, out / "curve", metric=space.metric)

    stage("5/8 samples", (out / "samples.png").is_file(), lambda: compare_samples(teacher, model, baseline, out))
    photos = data.resolution if name == "photos" else 0
    stage("6/8 evaluation", (out / "eval" / "eval.md").is_file(),
          lambda: evaluate(model, teacher, baseline, out / "eval", num, photos))  # fmt: skip
    noise = torch.randn(8, model.img_channels, model.img_resolution, model.img_resolution,
                        generator=torch.Generator().manual_seed(0)).to(device)  # fmt: skip
    stage("7/8 spectral analysis", (out / "analysis" / "analysis.md").is_file(),
          lambda: analysis.analyze(model, noise, out / "analysis", num_times=6 if quick else 12))  # fmt: skip
    known = examples(data, 32).to(device)  # 4 shown, all measured
    stage("8/8 editing", (out / "edit").is_dir() and any((out / "edit").glob("*.png")),
          lambda: editing.run(model, out / "edit", num=4, known=known))  # fmt: skip
    if quality or CONFIGS[name][3]:
        runs = {"HKD (all three)": out / "hkd", "direct regression": out / "baseline"}
        ablation = out / "ablation"
        work = lambda: experiments.ablate(config, teacher, out_dir=ablation, num=num, folders=runs, log=log)  # noqa: E731
        stage("9 ablation", (ablation / "ablation.md").is_file(), work)
    report = write_report(out, timings, quick, quality, name)
    log(f"[demo] report: {report}")
    return report


def evaluate(model, teacher, baseline, out: Path, num: int, photos: int = 0) -> Path:
    """The eval table (hkd.evaluation.evaluate); for photos patches of side `photos`, first what their Frechet
    distance means: its scale on real and corrupted patches (eval/feature_space.md)."""
    from hkd import evaluation, feature_space

    if photos:
        atomic_write(out / "feature_space.md", feature_space.photos_scale(photos, num) + "\n")
    return evaluation.evaluate(model, teacher, baseline=baseline, num=num, out_dir=out)


def compare_samples(teacher, model, baseline, out: Path, num: int = 32, seed: int = 0) -> Path:
    """samples.png: the teacher's Heun endpoint (35 evaluations), HKD and the direct regression baseline (one
    evaluation each) from the same noise."""
    from hkd.edm import heun_sampler
    from hkd.figures import image_table, save_figure

    device = next(model.parameters()).device
    shape = (num, model.img_channels, model.img_resolution, model.img_resolution)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    with torch.no_grad():
        images = [
            heun_sampler(teacher, noise)[1][-1],
            model.generate(noise),
            baseline.generate(noise),
        ]
    labels = ["teacher, 35 evaluations", "HKD, 1 evaluation", "direct regression, 1 evaluation"]
    fig = image_table([images], [""], labels, "The same noise, three generators", nrow=8)
    return save_figure(fig, out / "samples.png", dpi=200)


def _images(folder: Path, root: Path) -> list[str]:
    return [f"![{p.stem}]({p.relative_to(root).as_posix()})" for p in sorted(folder.glob("*.png"))]


def _text(path: Path) -> str:
    """A Markdown file's body, without its own title (the report gives the section its heading)."""
    if not path.is_file():
        return f"*({path.name} missing)*"
    lines = path.read_text().strip().splitlines()
    return "\n".join(lines[1:] if lines and lines[0].startswith("# ") else lines).strip()


def _edit_errors(path: Path) -> str:
    """The inpainting and colourisation errors of edit.json, beside their baselines, in one sentence."""
    try:
        e = json.loads(path.read_text())
    except (OSError, ValueError):
        return ""
    parts = []
    if "inpaint_rmse" in e:
        parts.append(f"inpainting RMS error over the unknown half {e['inpaint_rmse']:.4g} (the given half's mean "
                     f"colour: {e['inpaint_rmse_mean_fill']:.4g})")  # fmt: skip
    if "colourise_rmse" in e:
        parts.append(
            f"colourisation RMS error {e['colourise_rmse']:.4g} (the gray image: {e['colourise_rmse_gray']:.4g})"
        )
    return f"On {e['known']} known images (pixels in [-1, 1]): {'; '.join(parts)}." if parts else ""


def write_report(
    out: Path, timings: dict[str, float], quick: bool, quality: bool = False, name: str = "digits"
) -> Path:
    """report.md: sample grids, the evaluation table, the spectral analysis and the edits, with relative links."""
    from hkd.figures import atomic_write

    title, data, scale, ablation = CONFIGS[name]
    parts = [
        f"# HKD demo on {title}" + (" (--quick: a smoke run, the numbers mean nothing)" if quick else ""),
        f"{data} HKD: encoder -> per-level Koopman evolution exp(tau A) -> decoder, trained on the teacher's PF-ODE "
        "trajectories (Algorithm 1); one network evaluation per image.",
        "## Samples",
        "![samples](samples.png)" if (out / "samples.png").is_file() else "*(samples.png missing)*",
        "## Evaluation",
        _text(out / "eval" / "eval.md"),
        _text(out / "eval" / "feature_space.md") if (out / "eval" / "feature_space.md").is_file() else "",
        "## Learning curve",
        *_images(out / "curve", out),
        _text(out / "curve" / "curve.md"),
        "## Trajectory faithfulness",
        *_images(out / "eval", out),
        _text(out / "eval" / "faithfulness.md"),
        "## Spectral analysis",
        *_images(out / "analysis", out),
        _text(out / "analysis" / "analysis.md"),
        "## Editing",
        *_images(out / "edit", out),
        _edit_errors(out / "edit" / "edit.json"),
        "## Ablation",
        _text(out / "ablation" / "ablation.md")
        if (out / "ablation" / "ablation.md").is_file()
        else "Not run yet: `hkd demo --quality` trains the paper's four configurations at its budget."
        if not ablation
        else "Not run yet: a re-run of the same command trains the ablation's two other configurations.",
        "## Run",
        f"Stage times (s, each from the run that did the stage): "
        f"{', '.join(f'{k} {v:.0f}' for k, v in sorted(timings.items()))}; total {sum(timings.values()):.0f}.",
        f"Settings: `hkd/configs/{name}.yaml` with "
        + ", ".join(f"`{o}`" for o in DEMO + scale + (QUICK if quick else []) + (QUALITY if quality else [])),
    ]
    return atomic_write(out / "report.md", "\n\n".join(p for p in parts if p) + "\n")
