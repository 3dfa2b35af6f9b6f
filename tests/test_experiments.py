"""hkd.experiments: the ablation, and the reuse / resume / train helper that it and the demo share."""

import pytest
import torch
from test_metrics import tiny_config, tiny_teacher

from hkd import experiments


@pytest.mark.slow
def test_ablation_trains_the_four_configurations_with_equal_budgets(classifier_cache, tmp_path):
    from hkd.edm import heun_sampler

    teacher = tiny_teacher()
    times, states = heun_sampler(teacher, torch.randn(8, 1, 16, 16), num_steps=3)
    dataset = [{"states": states[:-1, i].float(), "times": times[:-1].float()} for i in range(8)]  # t > 0
    rows, written = experiments.ablate(tiny_config(tmp_path), teacher, out_dir=tmp_path, num=4, dataset=dataset)
    assert [(r["koopman"], r["trajectory_loss"], r["hierarchy"]) for r in rows] == [
        (k, c, h) for _, k, c, h, _ in experiments.ABLATION
    ]
    assert [r["paper_fid_cifar10"] for r in rows] == [5.72, 5.57, 4.78, 3.30]
    runs = sorted(p for p in tmp_path.iterdir() if (p / "model").is_dir())
    assert len(runs) == 4
    # a rerun reuses the finished runs and gives the same table
    again, _ = experiments.ablate(tiny_config(tmp_path), teacher, out_dir=tmp_path, num=4, dataset=dataset)
    assert again == rows


def test_an_interrupted_ablation_run_stops_the_ablation(tmp_path, monkeypatch):
    """The trainer raises RunStopped after a SIGTERM checkpoint: the ablation must not go on."""
    import hkd.train
    from hkd.errors import RunStopped

    calls = []

    def stopped(config, **kwargs):
        calls.append(config)
        raise RunStopped("stopped by SIGTERM at step 3: checkpoint.pt written; run again to continue")

    monkeypatch.setattr(hkd.train, "train", stopped)
    with pytest.raises(RunStopped, match="stopped by SIGTERM.*run again"):
        experiments.ablate(tiny_config(tmp_path), tiny_teacher(), out_dir=tmp_path, num=2)
    assert len(calls) == 1 and not (tmp_path / "ablation.md").exists()


def test_trained_model_trains_a_new_run_resumes_an_interrupted_one_and_reuses_a_finished_one(tmp_path, monkeypatch):
    import hkd.train
    from hkd.model import HKDModel, ModelConfig
    from hkd.train import TrainConfig

    config = tiny_config(tmp_path)
    model = HKDModel(ModelConfig(**config["model"]))
    calls = []

    def train(config, *, resume, dataset, log):
        calls.append(resume)
        return {"ema": model}

    monkeypatch.setattr(hkd.train, "train", train)
    assert experiments.trained_model(config) is model and calls == [False]
    assert not experiments.finished(TrainConfig(**config["train"]))
    (tmp_path / hkd.train.CHECKPOINT_NAME).write_bytes(b"")  # an interrupted run
    experiments.trained_model(config)
    assert calls == [False, True]
    model.save_pretrained(tmp_path / "model")  # a finished run: loaded, not trained again
    reused = experiments.trained_model(config)
    assert calls == [False, True] and experiments.finished(TrainConfig(**config["train"])) and not reused.training
    for (name, ours), theirs in zip(model.state_dict().items(), reused.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs), name
