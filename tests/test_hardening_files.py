"""Untrusted files cost a bounded amount (deflate bombs, huge declared lengths, alias bombs, oversized configs), no
command replaces a file hkd did not write, and no NaN passes silently (configs, reference statistics, shards)."""

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import torch
from helpers import edm_format

from hkd import config, edm_pickle, files, metrics, trajectories
from hkd.cli import main
from hkd.errors import ConfigError, NonFiniteError, UserError
from hkd.model import HKDModel, ModelConfig

BOMB = 128 << 20  # what a bomb inflates to: 128 MiB of zeros, about 130 kB deflated


def run(argv, capsys):
    """hkd ARGV in this process: (exit code, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit:
        code = exit.code
    return code, capsys.readouterr().err


def one_line(code, err, fragment):
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1 and len(err) < 600, err
    assert fragment in err, err


def peak_growth(code: str) -> tuple[str, int]:
    """(stdout, growth of the peak resident memory in MiB) of `code` run in a fresh process after the imports."""
    script = "import resource, torch, numpy, hkd.files, hkd.edm_pickle, hkd.metrics\n"
    script += "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
    script += "try:\n" + textwrap.indent(textwrap.dedent(code), "    ") + "\n"
    script += "except Exception as error:\n    print(type(error).__name__, str(error)[:300])\n"
    script += "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    *lines, growth = out.stdout.strip().splitlines()
    return "\n".join(lines), int(growth)


def deflate_bomb(torch_file: bytes, record_suffix: str = "data/0") -> bytes:
    """A torch.save zip with the record ending in `record_suffix` replaced by BOMB zero bytes, deflated."""
    source, out = zipfile.ZipFile(io.BytesIO(torch_file)), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as bomb:
        for info in source.infolist():
            data = bytes(BOMB) if info.filename.endswith(record_suffix) else source.read(info)
            bomb.writestr(info.filename, data)
    return out.getvalue()


def torch_bytes(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Bounded cost


def test_a_deflated_teacher_checkpoint_is_refused_before_it_inflates(tmp_path, capsys):
    path = tmp_path / "teacher.pt"
    path.write_bytes(deflate_bomb(torch_bytes({"format": "hkd-teacher", "w": torch.zeros(4)})))
    assert path.stat().st_size < BOMB // 100
    output, growth = peak_growth(f"hkd.files.load({str(path)!r})")
    assert "CorruptFileError" in output and "declares" in output and growth < 40, (output, growth)
    code, err = run(["trajectories", "--teacher", path, "--out", tmp_path / "s", "--device", "cpu"], capsys)
    one_line(code, err, "more than its")


def test_a_deflated_inception_file_is_refused_before_it_inflates(tmp_path):
    pytest.importorskip("torch_fidelity")
    path = tmp_path / metrics.INCEPTION_FILE
    path.write_bytes(deflate_bomb(torch_bytes({"w": torch.zeros(4)})))
    output, growth = peak_growth(f"hkd.metrics.Inception({str(path)!r})")
    assert "CorruptFileError" in output and "declares" in output and growth < 40, (output, growth)


def test_a_deflated_reference_npz_is_refused_before_it_inflates(tmp_path):
    path = tmp_path / "ref.npz"
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (4096, 4096)})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("mu.npy", torch_npy(np.zeros(4096)))
        archive.writestr("sigma.npy", header.getvalue() + bytes(4096 * 4096 * 8))
    output, growth = peak_growth(f"hkd.metrics.load_stats({str(path)!r})")
    assert "CorruptFileError" in output and "declares" in output and growth < 40, (output, growth)


def torch_npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


class _Storage:
    """Pickles as EDM's storages do: torch.storage._load_from_bytes(blob)."""

    def __init__(self, blob):
        self.blob = blob

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.blob,))


def test_edm_pickle_bombs_are_refused_within_the_files_size(tmp_path, capsys):
    bomb = tmp_path / "bomb.pkl"  # a storage record that is a deflated zip
    bomb.write_bytes(pickle.dumps({"ema": _Storage(deflate_bomb(torch_bytes(torch.zeros(4))))}))
    output, growth = peak_growth(f"hkd.edm_pickle.read_snapshot({str(bomb)!r})")
    assert "EDMPickleError" in output and "declares" in output and growth < 40, (output, growth)
    for length in (2**31, 2**40, 2**63):  # a tiny pickle declaring a huge bytes object
        tiny = tmp_path / f"tiny{length}.pkl"
        tiny.write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", length) + b"abc")
        with pytest.raises(edm_pickle.EDMPickleError, match="corrupt or not an EDM snapshot"):
            edm_pickle.read_snapshot(tiny)
        code, err = run(["import-teacher", tiny, "--out", tmp_path / "out"], capsys)
        one_line(code, err, "corrupt or not an EDM snapshot")
    output, growth = peak_growth(f"hkd.edm_pickle.read_snapshot({str(tmp_path / 'tiny1099511627776.pkl')!r})")
    assert "EDMPickleError" in output and growth < 40, (output, growth)


def test_an_edm_tensor_may_not_view_more_than_its_storage():
    storage = torch.TypedStorage(wrap_storage=torch.zeros(4).untyped_storage(), dtype=torch.float32, _internal=True)
    with pytest.raises(edm_pickle.EDMPickleError, match="elements over a storage"):  # stride 0: 2^40 elements
        edm_pickle._rebuild_tensor(storage, 0, (1 << 20, 1 << 20), (0, 0))
    assert edm_pickle._rebuild_tensor(storage, 0, (2, 2), (2, 1)).shape == (2, 2)


def test_yaml_alias_bombs_are_refused(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n"
    bomb += "".join(f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb)
    assert len(bomb) < 400
    with pytest.raises(ConfigError, match=r"aliases \(\*name\) are not allowed") as error:
        config.load(path)
    assert len(str(error.value)) < 300
    with pytest.raises(ConfigError, match="aliases") as error:
        config.load("digits", ["train.lr=" + bomb.replace("\n", ", ").join("{}")])
    assert len(str(error.value)) < 300
    (tmp_path / "huge.yaml").write_text("#" * (config.CONFIG_BYTES + 1))
    with pytest.raises(ConfigError, match="larger than a config may be"):
        config.load(tmp_path / "huge.yaml")


def test_an_error_never_prints_an_unbounded_value():
    with pytest.raises(ConfigError) as error:
        config.load("digits", ["model.channel_mult=" + str([1] * 100_000)])
    assert len(str(error.value)) < 300
    with pytest.raises(ConfigError) as error:
        config.load("digits", ["x" * 100_000])
    assert len(str(error.value)) < 300


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("imported")
    edm_format.write_snapshot(root / "edm.pkl", edm_format.songunet(img_resolution=16, model_channels=8))
    assert main(["import-teacher", str(root / "edm.pkl"), "--out", str(root / "teacher")]) == 0
    HKDModel(ModelConfig(img_resolution=8, img_channels=1, model_channels=4, channel_mult=(1,))).save_pretrained(
        root / "model"
    )
    return root


def edited(folder, tmp_path, name, edit):
    """A copy of the model folder `folder` with its config.json changed by `edit`."""
    copy = tmp_path / name
    copy.mkdir()
    (copy / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    saved = json.loads((folder / "config.json").read_text())
    edit(saved)
    (copy / "config.json").write_text(json.dumps(saved))
    return copy


def test_oversized_networks_in_config_json_are_refused_naming_the_limit(imported, tmp_path, capsys):
    model = edited(imported / "model", tmp_path, "model", lambda c: c["model"].update(num_blocks=1_000_000))
    code, err = run(["generate", "--model", model, "--out", tmp_path / "g"], capsys)
    one_line(code, err, "model.num_blocks must be an integer in [1, 32] (hkd's limit)")
    teacher = edited(imported / "teacher", tmp_path, "teacher", lambda c: c["unet"].update(num_blocks=1_000_000))
    code, err = run(["trajectories", "--teacher", teacher, "--out", tmp_path / "s"], capsys)
    one_line(code, err, "unet.num_blocks must be an integer in [1, 32] (hkd's limit)")


def test_an_imported_teacher_is_checked_against_its_weights_before_it_is_built(imported, tmp_path):
    # a declared network of gigabytes over the small weights: refused from the shapes, nothing allocated
    big = edited(imported / "teacher", tmp_path, "big", lambda c: c["unet"].update(model_channels=2048))
    code = f"hkd.edm_pickle.load_imported({str(big)!r})"
    output, growth = peak_growth(code)
    assert "CorruptFileError" in output and "does not match config.json" in output and growth < 100, (output, growth)


def test_a_manifest_declaring_a_billion_shards_is_one_problem(imported, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    spec = trajectories.make_spec({"source": "x", "config": {}}, trajectories.TrajectoryConfig(), (1, 4, 4))
    (store / "manifest.json").write_text(json.dumps({**spec, "num_shards": 10**9, "num_trajectories": 10**9,
                                                     "shard_size": 1, "shards": {}}))  # fmt: skip
    problems = trajectories.verify_store(store)
    assert len(problems) == 1 and "num_shards" in problems[0]
    with pytest.raises(trajectories.CorruptShardError, match="num_shards"):
        trajectories.TrajectoryDataset(store)
    with pytest.raises(ConfigError, match="at most 100000 shards"):
        trajectories.TrajectoryConfig(num_trajectories=10**9, shard_size=1)


# ---------------------------------------------------------------------------------------------------------------
# No data lost


def test_import_teacher_never_replaces_a_model_folder_or_a_users_config(imported, tmp_path, capsys):
    pkl = imported / "edm.pkl"
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        (model / name).write_bytes((imported / "model" / name).read_bytes())
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    for flags in ([], ["--overwrite"]):  # an HKD model is never an import's output, --overwrite or not
        code, err = run(["import-teacher", pkl, "--out", model, *flags], capsys)
        one_line(code, err, "hkd did not write it")
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    user = tmp_path / "user"
    user.mkdir()
    (user / "config.json").write_text('{"mine": true}')
    code, err = run(["import-teacher", pkl, "--out", user, "--overwrite"], capsys)
    one_line(code, err, "hkd did not write it")
    assert (user / "config.json").read_text() == '{"mine": true}' and not (user / "model.safetensors").exists()
    out = tmp_path / "teacher"
    assert run(["import-teacher", pkl, "--out", out], capsys)[0] == 0
    code, err = run(["import-teacher", pkl, "--out", out], capsys)
    one_line(code, err, "pass --overwrite to replace it")
    assert run(["import-teacher", pkl, "--out", out, "--overwrite"], capsys)[0] == 0


def test_export_never_replaces_a_users_file_or_temporary(imported, tmp_path, capsys):
    model = imported / "model"
    report = tmp_path / "report.md"
    report.write_text("# my report")
    (tmp_path / ".tmp-out.pt2").write_text("the user's")
    for flags in ([], ["--overwrite"]):
        code, err = run(["export", "--model", model, "--format", "pt2", "--out", report, *flags], capsys)
        one_line(code, err, "hkd did not write it")
    assert report.read_text() == "# my report"
    code, err = run(["export", "--model", model, "--format", "pt2", "--out", tmp_path], capsys)
    one_line(code, err, "is a folder")
    out = tmp_path / "out.pt2"
    assert run(["export", "--model", model, "--format", "pt2", "--out", out], capsys)[0] == 0
    assert (tmp_path / ".tmp-out.pt2").read_text() == "the user's"
    code, err = run(["export", "--model", model, "--format", "pt2", "--out", out], capsys)
    one_line(code, err, "pass --overwrite to replace it")
    assert run(["export", "--model", model, "--format", "pt2", "--out", out, "--overwrite"], capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".tmp-out.pt2"]


def test_trajectories_never_replace_a_users_shard(imported, tmp_path, capsys):
    out = tmp_path / "store"
    out.mkdir()
    (out / "shard_00000.npy").write_bytes(b"the user's array")
    args = ["trajectories", "--teacher", imported / "teacher", "--out", out, "--device", "cpu", "--quiet"]
    code, err = run([*args, "trajectories.num_trajectories=2", "trajectories.num_steps=2"], capsys)
    one_line(code, err, "but no manifest.json")
    assert (out / "shard_00000.npy").read_bytes() == b"the user's array"


def test_fid_ref_never_replaces_an_npz_it_did_not_write(tmp_path, capsys):
    users = tmp_path / "users.npz"
    np.savez(users, mu=np.zeros(3), sigma=np.eye(3))
    before = users.read_bytes()
    for flags in ([], ["--overwrite"]):
        code, err = run(["fid-ref", "digits", "--out", users, *flags], capsys)
        one_line(code, err, "hkd did not write it")
    assert users.read_bytes() == before and not metrics.is_stats_file(users)
    ours = metrics.save_stats(tmp_path / "ours.npz", torch.zeros(3), torch.eye(3))
    assert metrics.is_stats_file(ours)
    code, err = run(["fid-ref", "digits", "--out", ours], capsys)
    one_line(code, err, "pass --overwrite to replace it")
    with pytest.raises(UserError, match="is a folder"):
        files.refuse_replace(tmp_path, lambda p: True, True)


# ---------------------------------------------------------------------------------------------------------------
# No silent NaN


@pytest.mark.parametrize("value", ["Infinity", "NaN", "1e999"])
def test_nonfinite_values_in_config_json_are_refused_before_work(imported, tmp_path, capsys, value):
    def infinite(saved):
        saved["model"]["sigma_max"] = "X"

    model = edited(imported / "model", tmp_path, "model", infinite)
    (model / "config.json").write_text((model / "config.json").read_text().replace('"X"', value))
    code, err = run(["generate", "--model", model, "--out", tmp_path / "g"], capsys)
    one_line(code, err, "config.json is corrupt")
    code, err = run(["export", "--model", model, "--format", "pt2", "--out", tmp_path / "m.pt2"], capsys)
    one_line(code, err, "config.json is corrupt")
    teacher = edited(imported / "teacher", tmp_path, "teacher", lambda c: c["precond"].update(sigma_data="X"))
    (teacher / "config.json").write_text((teacher / "config.json").read_text().replace('"X"', value))
    code, err = run(["trajectories", "--teacher", teacher, "--out", tmp_path / "s"], capsys)
    one_line(code, err, "config.json is corrupt")
    assert not (tmp_path / "m.pt2").exists()


class NaNTeacher(torch.nn.Module):
    img_channels, img_resolution, identity = 1, 4, {"source": "test", "config": {}, "hash": "0"}

    def forward(self, x, sigma):
        return x * float("nan")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_nonfinite_shard_is_never_marked_finished(tmp_path, capfd, workers):
    cfg = trajectories.TrajectoryConfig(num_trajectories=4, num_steps=2, shard_size=2, batch_size=2)
    with pytest.raises(NonFiniteError, match="NaN or inf"):  # a worker's error, raised in the parent
        trajectories.write_store(NaNTeacher(), tmp_path, cfg, workers=workers, progress=False)
    assert trajectories.read_manifest(tmp_path)["shards"] == {} and not list(tmp_path.glob("shard_*"))
    assert "Traceback" not in capfd.readouterr().err  # no worker printed one


def test_a_nonfinite_shard_with_workers_is_one_line(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr("hkd.teacher.load_teacher", lambda path, device: NaNTeacher())
    args = ["trajectories", "--teacher", tmp_path / "t", "--out", tmp_path / "s", "--device", "cpu", "--quiet"]
    code, err = run([*args, "--workers", 2, "trajectories.num_trajectories=4", "trajectories.shard_size=2",
                     "trajectories.num_steps=2"], capfd)  # fmt: skip
    one_line(code, err, "NaN or inf values")
    assert trajectories.read_manifest(tmp_path / "s")["shards"] == {}


def test_a_refused_model_or_teacher_creates_no_out_folder(imported, tmp_path, capsys):
    wrong = edited(imported / "model", tmp_path, "wrong", lambda c: c["model"].update(num_blocks=1_000_000))
    out = tmp_path / "new" / "out"
    for argv in [
        ["generate", "--model", wrong, "--out", out],
        ["generate", "--model", tmp_path / "missing", "--out", out],
        ["trajectories", "--teacher", wrong, "--out", out],
        ["trajectories", "--teacher", tmp_path / "missing", "--out", out],
        ["trajectories", "--teacher", imported / "teacher", "--out", out, "--device", "cpu", "--workers", 2,
         "trajectories.sigma_max=.inf"],
        ["analyze", "--model", wrong, "--out", out],
        ["edit", "--model", wrong, "--out", out],
    ]:  # fmt: skip
        code, err = run(argv, capsys)
        assert code == 2 and not (tmp_path / "new").exists(), (argv, err)
    (tmp_path / "file").write_text("mine")  # a file in the way is still refused before the model is read
    code, err = run(["generate", "--model", tmp_path / "missing", "--out", tmp_path / "file"], capsys)
    one_line(code, err, "is a file, not a folder")


def stats_file(path, mu, sigma):
    np.savez(path, mu=mu, sigma=sigma)
    return path


def test_reference_statistics_are_checked_before_sampling(tmp_path):
    d = 8
    a = np.random.default_rng(0).standard_normal((d, d))
    good = a @ a.T
    cases = {
        "NaN": (np.zeros(d), np.where(np.eye(d) > 0, np.nan, good)),
        "infinite": (np.full(d, np.inf), good),
        "not symmetric": (np.zeros(d), good + np.triu(np.ones((d, d)), 1)),
        "not positive semi-definite": (np.zeros(d), good - 100 * np.eye(d)),
        "complex": (np.zeros(d, complex), good),
        "<U": (np.array(["a"] * d), good),
        "bool": (np.zeros(d, bool), good),
        "do not fit": (np.zeros(d), good[:3]),
    }
    for fragment, (mu, sigma) in cases.items():
        with pytest.raises(ValueError, match=fragment):
            metrics.load_stats(stats_file(tmp_path / "s.npz", mu, sigma))
    with pytest.raises(ValueError, match="statistics of 8 features; Inception's pool3 gives 2048"):
        metrics.load_stats(stats_file(tmp_path / "s.npz", np.zeros(d), good), metrics.INCEPTION_FEATURES)
    np.save(tmp_path / "o.npy", np.array([{"a": 1}] * d, dtype=object), allow_pickle=True)
    with zipfile.ZipFile(tmp_path / "o.npz", "w") as archive:
        archive.write(tmp_path / "o.npy", "mu.npy")
        archive.writestr("sigma.npy", torch_npy(good))
    with pytest.raises(ValueError, match="not FID reference statistics"):
        metrics.load_stats(tmp_path / "o.npz")
    mu, sigma = metrics.load_stats(stats_file(tmp_path / "s.npz", np.ones(d, np.float32), good))
    assert mu.dtype == torch.float64 and torch.equal(sigma, torch.from_numpy(good))
