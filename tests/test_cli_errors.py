"""Every command, given bad arguments, paths or environment: exit code 2 and one line naming the problem, no
traceback, before any work."""

import errno
import os
import subprocess
import sys

import pytest
import torch

from hkd.cli import main
from hkd.model import HKDModel, ModelConfig

NO_GPU = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return make_paths(tmp_path_factory.mktemp("cli"))


def make_paths(root):
    """The paths CASES name: a tiny model folder, a file, an empty and a corrupt folder, a user's folder."""
    HKDModel(ModelConfig(img_resolution=8, img_channels=1, model_channels=4, channel_mult=(1,))).save_pretrained(
        root / "model"
    )
    (root / "file").write_text("a file, not a folder")
    (root / "empty").mkdir()
    (root / "corrupt").mkdir()
    (root / "corrupt" / "config.json").write_text("{not json")
    (root / "corrupt" / "model.safetensors").write_bytes(b"\0" * 64)
    (root / "corrupt" / "manifest.json").write_text("{not json")
    (root / "user").mkdir()
    (root / "user" / "notes.txt").write_text("the user's")
    return {name: str(root / name) for name in ("model", "file", "empty", "corrupt", "user")} | {"root": str(root)}


# (command line with {placeholders}, a fragment the error must hold). {out} is a fresh folder per case.
CASES = [
    ("", "required: COMMAND"),
    ("fly", "invalid choice: 'fly'"),
    ("generate --model {model} --out {out} --num 0", "--num: must be >= 1, got 0"),
    ("generate --model {model} --out {out} --num -3", "--num: must be >= 1, got -3"),
    ("generate --model {model} --out {out} --num many", "'many' is not an integer"),
    ("generate --model {model} --out {out} --batch-size 0", "--batch-size: must be >= 1"),
    ("generate --model {model} --out {out} --trajectory 1", "--trajectory K needs K >= 2"),
    ("generate --model {model} --out {out} --trajectory -1", "--trajectory: must be >= 0"),
    ("generate --model {root}/missing --out {out}", "not found"),
    ("generate --model {empty} --out {out}", "config.json not found"),
    ("generate --model {corrupt} --out {out}", "config.json is corrupt"),
    ("generate --model {model} --out {file}", "is a file, not a folder"),
    ("generate --model {model} --out {file}/sub", "is a file, not a folder"),
    ("generate --model {model} --out {out} --device bogus", "invalid choice: 'bogus'"),
    ("generate --model {model} --out {out}", None),  # the good command, for contrast (exit 0)
    ("eval --model {model} --teacher {model} --out {out} --num 1", "--num: must be >= 2"),
    ("eval --model {model} --teacher {model} --out {out} --few-steps 0", "--few-steps: must be >= 1"),
    ("eval --model {model} --teacher {model} --out {out}", "is an HKD model (hkd train's output), not a teacher"),
    ("eval --model {model} --teacher {root}/missing --out {out}", "not found"),
    ("analyze --model {model} --out {out} --times 0", "--times: must be >= 2"),
    ("analyze --model {model} --out {out} --num 0", "--num: must be >= 1"),
    ("edit --model {model} --out {out} --ratios 2", "every ratio must be in [0, 1]"),
    ("edit --model {model} --out {out} --ratios a,b", "not a comma-separated list of numbers"),
    ("edit --model {model} --out {out} --steps 0", "--steps: must be >= 1"),
    ("edit --model {model} --out {out} --band top", "invalid choice: 'top'"),
    ("edit --model {model} --out {out} --t-edit 500", "--t-edit must lie in [eps, T]"),
    ("train train.out={out} model.model_channels=3", "model.model_channels must be even with spectral generators"),
    ("ablate --out {out} --num 0", "--num: must be >= 2"),
    ("ablate --out {out} trian.batch=8", "unknown config section 'trian' (did you mean train?)"),
    ("trajectories --teacher {model} --out {out} --workers 0", "--workers: must be >= 1"),
    ("trajectories --teacher {model} --out {out} --max-shards -1", "--max-shards: must be >= 1, got -1"),
    ("trajectories --teacher {model} --out {out} --num 0", "--num: must be >= 1"),
    ("trajectories --teacher {model} --out {out}", "is an HKD model (hkd train's output), not a teacher"),
    ("trajectories --teacher {root}/missing --out {out}", "not found"),
    ("trajectories --out {out}", "--teacher and --out are required"),
    ("trajectories --teacher {model} --out {file}", "is a file, not a folder"),
    ("trajectories --verify {root}/missing", "no trajectory store"),
    ("trajectories --verify {corrupt}", "manifest.json is corrupt"),
    ("trajectories --teacher {model} --out {out} trajectories.shard_size=0", "trajectories.shard_size must be >= 1"),
    ("train train.out={out} train.max_steps=0", "train.max_steps must be >= 1"),
    ("train train.out={out} trian.batch=8", "unknown config section 'trian'"),
    ("train train.out={out} train.bacth=8", "unknown key train.bacth (did you mean train.batch?)"),
    ("train train.out={out} train.lr=fast", "train.lr must be a number, got 'fast'"),
    ("train train.out={out} train.batch=0", "train.batch must be >= 1"),
    ("train train.out={out} train.device=bogus", "train.device must be one of auto, cpu, cuda"),
    ("train train.out={out} model.img_resolution=-8", "model.img_resolution must be >= 1"),
    ("train train.out={out} model.encoder_sees_noise=true model.encoder_scale=estimated", "must be fixed with"),
    ("train train.out={out} model.encoder_scale=t", "model.encoder_scale must be one of"),
    ("train --config nope train.out={out}", "config 'nope' not found"),
    ("train train.out={out} --resume", "--resume: no checkpoint"),
    ("train train.out={file}", "train.out '{file}' is a file, not a folder"),
    ("train train.out={out} train.teacher={model}", "is an HKD model (hkd train's output), not a teacher"),
    ("train train.out={out} train.teacher=null train.store={root}/missing", "no trajectory store"),
    ("train train.out={out} train.teacher=null train.store=null", "train.store is not set"),
    ("train-teacher --out {out} teacher.steps=0", "teacher.steps must be >= 1"),
    ("train-teacher --out {out} data.name=mnist", "unknown data.name 'mnist'"),
    ("train-teacher --out {out} teacher.lr=-1e-3", "teacher.lr must be > 0"),
    ("train-teacher --out {file}", "is a file, not a folder"),
    ("demo --out {out} --device bogus", "invalid choice: 'bogus'"),
    ("demo --quick --fresh --out {user}", "not made by `hkd demo`"),
    ("demo --quick --out {file}", "is a file, not a folder"),
    ("demo --quick --out {out} train.epochz=3", "unknown key train.epochz (did you mean train.epochs?)"),
    ("bench --batch 0", "--batch: must be >= 1"),
    ("bench --repeats -1", "--repeats: must be >= 0"),
    ("bench --threads -2", "--threads: must be >= 0"),
    ("bench sparse", "invalid choice: 'sparse'"),
    ("generate --model {model} --out {out} --seed 18446744073709551616", "--seed: must be <= 9223372036854775807"),
    ("generate --model {model} --out {out} --num 1000000000", "--num: must be <= 100000 (hkd's limit)"),
    ("generate --model {model} --out {out} --trajectory 1000000", "--trajectory: must be <= 100"),
    ("export --model {model} --format pt2 --out {out} --batch 100000000", "--batch: must be <= 65536"),
    ("generate --model {model} --out {out} --num 1" + "0" * 5000, "is not an integer"),
    ("train train.out=''", "train.out must be a folder name"),
    ("train train.out={out} train.workers=1000000", "train.workers must be <= 256"),
    ("train train.out={out} train.threads=1000000", "train.threads must be <= 1024"),
    ("trajectories --teacher {model} --out {out} trajectories.sigma_max=.inf", "trajectories.sigma_max must be finite"),
    ("train-teacher --out {out} teacher.num_blocks=1000000", "teacher.num_blocks must be an integer in [1, 32]"),
    ("train-teacher --out {out} teacher.lr=[&a{sp}[1,1,1],*a,*a]", "aliases (*name) are not allowed"),
]
if NO_GPU:
    CASES += [
        ("generate --model {model} --out {out} --device cuda", "no CUDA GPU is available"),
        ("demo --quick --out {out} --device cuda", "no CUDA GPU is available"),
        ("trajectories --teacher {model} --out {out} --device cuda", "no CUDA GPU is available"),
        ("train train.out={out} train.device=cuda", "train.device=cuda: no CUDA GPU"),
    ]


def run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse
        code = exit.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("line", "fragment"), CASES, ids=[line or "(none)" for line, _ in CASES])
def test_bad_input_is_one_line_and_exit_2(line, fragment, paths, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default output folder would land here, not in the repository
    values = paths | {"out": str(tmp_path / "out"), "sp": " "}  # {sp}: a space inside one argument
    argv = [part.format(**values) for part in line.split()]
    code, err = run(argv, capsys)
    if fragment is None:
        assert code == 0, err
        return
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("hkd"), err
    assert fragment.format(**values) in err, err
    assert sorted(os.listdir(paths["user"])) == ["notes.txt"]  # nothing of the user's is touched


def test_the_process_prints_no_traceback(paths, tmp_path):
    """The same as a user sees it: a separate process, its whole stderr."""
    for line in ("generate --model {model} --out {out} --num 0", "train train.out={out} trian.batch=8",
                 "trajectories --teacher {model} --out {out}"):  # fmt: skip
        argv = [part.format(**paths, out=str(tmp_path / "out")) for part in line.split()]
        result = subprocess.run([sys.executable, "-m", "hkd.cli", *argv], capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "Traceback" not in result.stderr


def test_a_full_disk_is_one_line(paths, tmp_path, capsys, monkeypatch):
    from hkd import image_grid

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(image_grid, "atomic_write", full)
    code, err = run(["generate", "--model", paths["model"], "--out", str(tmp_path / "g"), "--num", "1"], capsys)
    assert code == 2 and "No space left on device" in err and "Traceback" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused_before_any_work(paths, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, err = run(["generate", "--model", paths["model"], "--out", str(locked / "g")], capsys)
    finally:
        locked.chmod(0o755)
    assert code == 2 and "read-only" in err


def test_a_bug_keeps_its_traceback(paths, tmp_path, monkeypatch):
    """Only user errors are one line: an unexpected exception (a bug) propagates with its traceback."""
    from hkd import model

    def bug(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(model, "generate_to", bug)
    with pytest.raises(ValueError, match="a bug"):
        main(["generate", "--model", paths["model"], "--out", str(tmp_path / "g")])
