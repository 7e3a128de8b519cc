"""The training loop on a tiny synthetic set: TINY_ARCH (conftest) at 32 px, a few dozen cells, CPU."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY_ARCH
from pap_severity import training
from pap_severity.checkpoints import ModelBundle, load_bundle
from pap_severity.config import Config, SplitConfig
from pap_severity.data.manifest import open_image
from pap_severity.data.splits import make_splits
from pap_severity.devices import COMPUTE_LOG_ENV, resolve_device
from pap_severity.evaluation import PREDICTION_COLUMNS, PROB_COLUMNS, is_better
from pap_severity.losses import balanced_class_weights
from pap_severity.models import build_model
from pap_severity.pipelines import get_pipeline
from pap_severity.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocess, channel_stats, square_resize

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cells(synth_set) -> dict:
    """The shared synthetic set (6 cells per class folder), 2 folds, calibration and test parts."""
    manifest, splits = synth_set["manifest"], synth_set["splits"]
    cv = splits[splits["part"] == "cv"]
    return {
        "manifest": manifest,
        "splits": splits,
        "train": cv[cv["fold"] != 0][["path", "severity"]],
        "val": cv[cv["fold"] == 0][["path", "severity"]],
        "test": splits[splits["part"] == "test"][["path", "severity"]],
    }


def tiny_config(**train) -> Config:
    cfg = Config()
    settings = {"epochs": 2, "batch_size": 16, "device": "cpu", "workers": 0, "seed": 0, "threads": 1, **train}
    return cfg.model_copy(update={
        "model": cfg.model.model_copy(update={"arch": TINY_ARCH, "weights": "none", "image_size": 32}),
        "train": cfg.train.model_copy(update=settings),
    })


def no_augment(cfg: Config) -> Config:
    off = {"hflip": False, "vflip": False, "rot90": False, "affine_degrees": 0.0, "affine_translate": 0.0,
           "affine_scale": 0.0, "color_jitter": 0.0}
    return cfg.model_copy(update={"augment": cfg.augment.model_copy(update=off)})


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_bundle(path)[0].model.state_dict()


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0.0 if atol == 0.0 else 1e-5, msg=key)


def assert_same_history(a: list[dict], b: list[dict]) -> None:
    assert [e["epoch"] for e in a] == [e["epoch"] for e in b]
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-7, nan_ok=True), key


def test_training_reduces_the_loss(cells, tmp_path):
    cfg = no_augment(tiny_config(epochs=6, scheduler="none", balance="none"))
    result = training.train_fold(cfg, "classification", cells["train"], cells["val"], tmp_path / "m.pt",
                                 progress=False)
    losses = [e["train_loss"] for e in result.history]
    assert len(losses) == 6
    assert losses[-1] < 0.7 * losses[0], losses
    assert result.checkpoint.is_file() and not training.resume_path(result.checkpoint).exists()
    bundle, extra = load_bundle(result.checkpoint)
    assert extra["complete"] and extra["history"] == result.history
    assert bundle.meta["best_epoch"] == result.best_epoch
    entry = result.history[0]
    assert {"epoch", "train_loss", "lr", "val_loss", "val_accuracy", "val_mean_auc", "val_qwk", "val_mse"} <= set(entry)


def test_compute_is_timed_only_when_asked(cells, tmp_path, monkeypatch):
    """PAP_SEVERITY_COMPUTE_LOG: one line per training epoch and prediction pass (benchmarks/pipeline_overhead.py)."""
    log = tmp_path / "compute.jsonl"
    cfg = tiny_config(epochs=2)
    monkeypatch.delenv(COMPUTE_LOG_ENV, raising=False)
    training.train_fold(cfg, "combined", cells["train"], cells["val"], tmp_path / "a.pt", progress=False)
    assert not log.exists()
    monkeypatch.setenv(COMPUTE_LOG_ENV, str(log))
    training.train_fold(cfg, "combined", cells["train"], cells["val"], tmp_path / "b.pt", progress=False)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["what"] for line in lines] == ["train", "predict"] * 2  # each epoch, then its validation
    for line in lines:
        assert line["forward"] > 0 and line["pid"] == os.getpid()
        assert (line["backward"] > 0 and line["step"] > 0) == (line["what"] == "train")
    assert_same_weights(weights(tmp_path / "a.pt"), weights(tmp_path / "b.pt"))  # timing changes nothing


def test_same_seed_same_result_other_seed_other_result(cells, tmp_path):
    cfg = tiny_config()
    a = training.train_fold(cfg, "combined", cells["train"], cells["val"], tmp_path / "a.pt", progress=False)
    b = training.train_fold(cfg, "combined", cells["train"], cells["val"], tmp_path / "b.pt", progress=False)
    assert_same_history(a.history, b.history)
    assert_same_weights(weights(a.checkpoint), weights(b.checkpoint))
    other = tiny_config(seed=1, epochs=1)
    c = training.train_fold(other, "combined", cells["train"], cells["val"], tmp_path / "c.pt", progress=False)
    assert c.history[0]["train_loss"] != a.history[0]["train_loss"]


def test_workers_do_not_change_the_result(cells, tmp_path):
    """Every draw's augmentation is seeded by (seed, epoch, position), not by the process."""
    a = training.train_fold(tiny_config(epochs=1), "combined", cells["train"], cells["val"], tmp_path / "a.pt",
                            progress=False)
    b = training.train_fold(tiny_config(epochs=1, workers=2), "combined", cells["train"], cells["val"],
                            tmp_path / "b.pt", progress=False)
    assert_same_history(a.history, b.history)
    assert_same_weights(weights(a.checkpoint), weights(b.checkpoint), atol=1e-6)


def test_the_epoch_sampler_is_a_function_of_seed_and_epoch():
    s = training.EpochSampler(50, seed=3)
    s.set_epoch(1)
    first = list(s)
    assert sorted(i for i, _ in first) == list(range(50))
    assert list(s) == first  # same epoch, same draws: what resume relies on
    s.set_epoch(2)
    assert list(s) != first
    # Weighted draws with replacement balance a 45/5 set.
    labels = torch.tensor([0] * 45 + [1] * 5)
    sampler = training.EpochSampler(50, 0, balanced_class_weights(labels, 2)[labels])
    drawn = []
    for epoch in range(1, 21):
        sampler.set_epoch(epoch)
        drawn += [labels[i].item() for i, _ in sampler]
    assert 0.4 < np.mean(drawn) < 0.6


@pytest.mark.parametrize("balance", ["weighted_loss", "sampler", "none"])
def test_balance_modes(cells, balance):
    """weighted_loss weighs every training batch's loss by class; sampler draws by class weight instead."""
    state, ctx, loader, _ = training.setup_training(tiny_config(balance=balance), "combined", cells["train"],
                                                    cells["val"], epochs=1)
    real = state.bundle.pipeline
    calls = []

    def recording_loss(out, y, cfg, w):
        calls.append((y.clone(), None if w is None else w.clone()))
        return real.loss(out, y, cfg, w)

    state.bundle.pipeline = dataclasses.replace(real, loss=recording_loss)
    training.train_one_epoch(state, ctx, loader, epoch=1)
    assert len(calls) == len(loader) > 0
    weighted = [(y, w) for y, w in calls if w is not None]
    sampler = loader.sampler
    assert isinstance(sampler, training.EpochSampler)
    labels = torch.tensor(cells["train"]["severity"].astype(int).tolist())
    class_weights = balanced_class_weights(labels)
    if balance == "weighted_loss":
        assert len(weighted) == len(calls) and sampler.weights is None
        for y, w in weighted:
            torch.testing.assert_close(w, class_weights[y])
        assert class_weights[1:].min() > class_weights[0]  # the rare classes weigh more than normal cells
    elif balance == "sampler":
        assert not weighted
        torch.testing.assert_close(sampler.weights, class_weights[labels])
    else:
        assert not weighted and sampler.weights is None


@pytest.mark.parametrize("scheduler", ["cosine", "onecycle", "none"])
def test_scheduler_choices(cells, tmp_path, scheduler):
    cfg = tiny_config(epochs=3, scheduler=scheduler, optimizer="sgd", lr=0.01, batch_size=8)
    result = training.train_fold(cfg, "classification", cells["train"], cells["val"], tmp_path / "m.pt",
                                 progress=False)
    lrs = [e["lr"] for e in result.history]
    if scheduler == "none":
        assert lrs == [0.01] * 3
    elif scheduler == "cosine":  # stepped per epoch: the lr of epoch e is 0.01 * (1 + cos(pi (e-1) / 3)) / 2
        assert lrs == pytest.approx([0.01 * (1 + np.cos(np.pi * e / 3)) / 2 for e in range(3)])
    else:  # stepped per batch: warms up, peaks, anneals to far below the peak
        assert lrs[0] != pytest.approx(0.01) and max(lrs) <= 0.01 + 1e-12 and lrs[-1] < 1e-4


def small_state(pipeline: str = "classification", fingerprint: str = "run") -> training.TrainState:
    torch.manual_seed(0)
    spec = get_pipeline(pipeline)
    model = build_model(TINY_ARCH, "none", spec.head)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return training.TrainState(
        bundle=ModelBundle(model, spec, TINY_ARCH, Preprocess(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=6),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        fingerprint=fingerprint,
    )


def take_a_step(state: training.TrainState) -> None:
    """Change every weight (as an epoch would) and the optimizer's and schedule's states: a random gradient step."""
    for p in state.bundle.model.parameters():
        p.grad = torch.randn_like(p)
    state.optimizer.step()
    state.scheduler.step()


def test_early_stopping_stops_after_patience_and_keeps_the_best_epoch(tmp_path):
    state = small_state()
    snapshots, trained = {}, []
    for epoch, accuracy in enumerate([0.2, 0.6, 0.4, 0.5, 0.3, 0.9], start=1):
        if state.stopped(patience=2):
            break
        take_a_step(state)
        snapshots[epoch] = {k: v.clone() for k, v in state.bundle.model.state_dict().items()}
        state.end_epoch({"epoch": epoch, "val_accuracy": accuracy}, "accuracy")
        trained.append(epoch)
    assert trained == [1, 2, 3, 4]  # two epochs without progress after the best: stop
    assert (state.best_epoch, state.best_metric, state.since_best) == (2, 0.6, 2)
    state.finish(tmp_path / "m.pt", {"role": "test"})
    bundle, extra = load_bundle(tmp_path / "m.pt")
    assert_same_weights(bundle.model.state_dict(), snapshots[2])
    assert extra["complete"] and (extra["best_epoch"], extra["best_metric"]) == (2, 0.6)
    assert [e["epoch"] for e in extra["history"]] == [1, 2, 3, 4]
    assert bundle.meta == {"role": "test", "best_epoch": 2, "epochs_run": 4, "best_metric": 0.6}


def test_without_a_metric_the_last_epoch_is_kept_and_nan_never_is_the_best(tmp_path):
    final = small_state()
    for epoch in (1, 2):
        take_a_step(final)
        final.end_epoch({"epoch": epoch, "train_loss": 1.0}, None)
    assert (final.best_epoch, final.since_best, final.stopped(1)) == (2, 0, False)
    assert np.isnan(final.best_metric)
    nan = small_state()
    for epoch in (1, 2):
        take_a_step(nan)
        nan.end_epoch({"epoch": epoch, "val_mse": float("nan")}, "mse")
    assert nan.stopped(2) and nan.best_epoch == 0
    nan.finish(tmp_path / "nan.pt", {})  # no epoch had a defined metric: the last weights
    bundle, extra = load_bundle(tmp_path / "nan.pt")
    assert extra["best_epoch"] == bundle.meta["best_epoch"] == 2 and np.isnan(extra["best_metric"])
    assert_same_weights(weights(tmp_path / "nan.pt"), {k: v for k, v in nan.bundle.model.state_dict().items()})


def test_the_train_state_is_saved_and_loaded_whole(tmp_path):
    state = small_state()
    for epoch, accuracy in enumerate([0.5, 0.3], start=1):
        take_a_step(state)
        state.end_epoch({"epoch": epoch, "val_accuracy": accuracy}, "accuracy")
    best = {k: v.clone() for k, v in state.best_weights.items()}
    state.bundle.meta = {"role": "cv"}
    state.save(tmp_path / "m.pt.resume")
    after_save = torch.rand(3)  # the RNG state the saved one restores
    assert load_bundle(tmp_path / "m.pt.resume")[1]["epoch"] == 2  # a bundle, for any reader

    loaded = small_state()
    loaded.load(tmp_path / "m.pt.resume")
    assert torch.equal(torch.rand(3), after_save)
    assert (loaded.epoch, loaded.best_epoch, loaded.best_value, loaded.since_best) == (2, 1, 0.5, 1)
    assert loaded.history == state.history and loaded.bundle.meta == {"role": "cv"}
    assert_same_weights(loaded.bundle.model.state_dict(), state.bundle.model.state_dict())
    assert_same_weights(loaded.best_weights, best)
    assert loaded.scheduler.state_dict() == state.scheduler.state_dict()
    assert loaded.optimizer.state_dict()["state"].keys() == state.optimizer.state_dict()["state"].keys()
    for key, value in state.optimizer.state_dict()["state"].items():
        torch.testing.assert_close(loaded.optimizer.state_dict()["state"][key], value)
    # Taking the same step from both gives the same weights: nothing that matters was left out.
    torch.manual_seed(1)
    take_a_step(state)
    torch.manual_seed(1)
    take_a_step(loaded)
    assert_same_weights(loaded.bundle.model.state_dict(), state.bundle.model.state_dict())

    with pytest.raises(ValueError, match="other settings"):
        small_state(fingerprint="another run").load(tmp_path / "m.pt.resume")


def test_training_stops_early_and_keeps_the_best_epoch(cells, tmp_path):
    """The loop follows the rule above: it stops `patience` epochs after the best one and keeps its weights."""
    checkpoint = tmp_path / "m.pt"
    calls, snapshots = [], {}

    def on_epoch(epoch, metrics):  # the epoch's state is saved when this runs
        calls.append((epoch, metrics["accuracy"]))
        snapshots[epoch] = weights(training.resume_path(checkpoint))

    cfg = tiny_config(epochs=6, patience=1, early_stopping_metric="accuracy", optimizer="sgd", lr=0.05,
                      scheduler="none")
    result = training.train_fold(cfg, "classification", cells["train"], cells["val"], checkpoint,
                                 progress=False, on_epoch=on_epoch)
    values = [value for _, value in calls]
    assert [epoch for epoch, _ in calls] == list(range(1, len(calls) + 1))
    assert len(calls) < 6, values  # these settings do stop early
    assert result.best_epoch == 1 + values.index(max(values)) and result.best_metric == max(values)
    assert len(calls) == result.best_epoch + 1  # patience 1: the first epoch without progress is the last
    assert len(result.history) == len(calls)
    assert_same_weights(weights(checkpoint), snapshots[result.best_epoch])


def test_lower_is_better_for_errors_and_nan_never_improves():
    assert is_better("mse", 0.1, 0.2) and not training.is_better("mse", 0.3, 0.2)
    assert is_better("accuracy", 0.3, 0.2) and not training.is_better("accuracy", 0.1, 0.2)
    assert is_better("mae", 1.0, None)
    assert not is_better("accuracy", float("nan"), None)
    assert is_better("accuracy", 0.0, float("nan"))


def test_divergence_is_reported_not_decoded(cells, tmp_path):
    cfg = tiny_config(epochs=1, optimizer="sgd", lr=1e6, scheduler="none")
    with pytest.raises(training.TrainingDiverged, match="lower train.lr"):
        training.train_fold(cfg, "regression", cells["train"], cells["val"], tmp_path / "m.pt", progress=False)


def test_unknown_stopping_metric_is_refused(cells, tmp_path):
    cfg = tiny_config(early_stopping_metric="acuracy")
    with pytest.raises(ValueError, match="acuracy"):
        training.train_fold(cfg, "combined", cells["train"], cells["val"], tmp_path / "m.pt", progress=False)


def test_on_epoch_exceptions_propagate_after_the_epoch_is_saved(cells, tmp_path):
    class Pruned(Exception):
        pass

    def prune(epoch, metrics):
        raise Pruned

    with pytest.raises(Pruned):
        training.train_fold(tiny_config(), "corn", cells["train"], cells["val"], tmp_path / "m.pt",
                            progress=False, on_epoch=prune)
    assert training.resume_path(tmp_path / "m.pt").is_file() and not (tmp_path / "m.pt").exists()


def test_dataset_statistics_unless_imagenet(cells, tmp_path, monkeypatch):
    cfg = tiny_config(epochs=1)
    result = training.train_fold(cfg, "sord", cells["train"], cells["val"], tmp_path / "a.pt", progress=False)
    pre = load_bundle(result.checkpoint)[0].preprocess
    images = [square_resize(open_image(p), 32) for p in cells["train"]["path"]]
    mean, std = channel_stats(images)
    assert pre.mean == pytest.approx(mean) and pre.std == pytest.approx(std) and pre.image_size == 32

    # ImageNet initialisation normalises with ImageNet statistics (weights not downloaded here).
    real_build = training.build_model
    monkeypatch.setattr(training, "build_model", lambda arch, w, head: real_build(arch, "none", head))
    imagenet = cfg.model_copy(update={"model": cfg.model.model_copy(update={"weights": "imagenet"})})
    result = training.train_fold(imagenet, "sord", cells["train"], cells["val"], tmp_path / "b.pt", progress=False)
    pre = load_bundle(result.checkpoint)[0].preprocess
    assert (pre.mean, pre.std) == (IMAGENET_MEAN, IMAGENET_STD)


def test_device_auto_picks_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="cuda"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_device_auto_is_cpu_on_this_machine():
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("this machine has an accelerator")
    assert resolve_device("auto").type == "cpu"


@pytest.mark.parametrize("pipeline", ["combined", "regression", "corn"])
def test_predict_items(cells, pipeline):
    torch.manual_seed(0)
    head = get_pipeline(pipeline).head
    bundle = ModelBundle(build_model(TINY_ARCH, "none", head), get_pipeline(pipeline), TINY_ARCH,
                         Preprocess(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    table = training.predict_items(bundle, cells["test"], batch_size=4)
    assert list(table.columns) == ["path", "severity", "pred", "score", *PROB_COLUMNS]
    assert table["path"].tolist() == cells["test"]["path"].tolist()
    assert table["severity"].tolist() == cells["test"]["severity"].astype(int).tolist()
    np.testing.assert_allclose(table[PROB_COLUMNS].sum(axis=1), 1.0, atol=1e-5)
    assert table["pred"].between(0, 4).all() and np.isfinite(table["score"]).all()
    if pipeline != "regression":  # classifiers: the score is the expected score of the probabilities
        np.testing.assert_allclose(table["score"], table[PROB_COLUMNS].to_numpy() @ np.arange(1, 6), atol=1e-4)
    one_by_one = training.predict_items(bundle, cells["test"][["path"]], batch_size=1)
    np.testing.assert_allclose(one_by_one["score"], table["score"], atol=1e-5)  # eval mode: batch-independent
    assert one_by_one["severity"].isna().all()


class RecordingCallbacks(training.CVCallbacks):
    """A real observer of cross_validate: what it was told, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.fold_metrics: dict[int, dict] = {}

    @contextmanager
    def pipeline_run(self, pipeline, out, resume, manifest):
        assert {"path", "severity"} <= set(manifest.columns)
        self.calls.append(("pipeline", pipeline, out.name, resume))
        yield
        self.calls.append(("pipeline end",))

    @contextmanager
    def fold_run(self, fold):
        self.calls.append(("fold", fold))
        yield
        self.calls.append(("fold end", fold))

    def on_epoch(self, entry):
        assert {"epoch", "train_loss", "lr", "val_loss", "val_accuracy"} <= entry.keys()
        self.calls.append(("epoch", entry["epoch"]))

    def on_fold_end(self, fold, result, metrics):
        assert result.checkpoint.is_file() and result.checkpoint.name == f"fold{fold}.pt"
        self.fold_metrics[fold] = metrics
        self.calls.append(("fold result", fold, result.best_epoch))

    def on_pipeline_end(self, fold_metrics):
        assert fold_metrics == [self.fold_metrics["0"], self.fold_metrics["1"]]
        self.calls.append(("means", len(fold_metrics)))


def test_cross_validate_writes_predictions_and_resume_reuses_folds(cells, tmp_path):
    cfg = tiny_config(epochs=1)
    out = tmp_path / "models"
    told = RecordingCallbacks()
    predictions = training.cross_validate(cfg, "combined", cells["manifest"], cells["splits"], out, progress=False,
                                          callbacks=told)
    assert tuple(predictions.columns) == PREDICTION_COLUMNS
    splits = cells["splits"]
    val = predictions[predictions["part"] == "val"]
    assert sorted(val["path"]) == sorted(splits.loc[splits["part"] == "cv", "path"])  # every cv cell once
    test = predictions[predictions["part"] == "test"]
    assert len(test) == 2 * (splits["part"] == "test").sum()  # each fold model on the test part
    folder = out / "combined"
    on_disk = pd.read_csv(folder / training.PREDICTIONS_FILE)
    assert len(on_disk) == len(predictions) and list(on_disk.columns) == list(PREDICTION_COLUMNS)
    summary = json.loads((folder / training.TRAINING_FILE).read_text())
    assert set(summary) == {"0", "1"} and len(summary["0"]["history"]) == 1
    for k in (0, 1):
        assert training.fold_checkpoint(out, "combined", k).is_file()
        assert told.fold_metrics[str(k)] == pytest.approx(summary[str(k)]["metrics"], nan_ok=True)
        assert {"val_accuracy", "calib_accuracy", "test_accuracy"} <= told.fold_metrics[str(k)].keys()

    def fold(k, epochs):
        k = str(k)
        return [("fold", k), *epochs, ("fold result", k, 1), ("fold end", k)]

    assert told.calls == [("pipeline", "combined", "combined", False), *fold(0, [("epoch", 1)]),
                          *fold(1, [("epoch", 1)]), ("means", 2), ("pipeline end",)]

    stamps = [training.fold_checkpoint(out, "combined", k).stat().st_mtime_ns for k in (0, 1)]
    told = RecordingCallbacks()
    again = training.cross_validate(cfg, "combined", cells["manifest"], cells["splits"], out, progress=False,
                                    resume=True, callbacks=told)
    assert [training.fold_checkpoint(out, "combined", k).stat().st_mtime_ns for k in (0, 1)] == stamps
    pd.testing.assert_frame_equal(again, predictions)
    # Reused folds train no epoch; the rest is reported again (an observer skips what it already has).
    assert told.calls == [("pipeline", "combined", "combined", True), *fold(0, []), *fold(1, []), ("means", 2),
                          ("pipeline end",)]


def test_cross_validate_refuses_splits_of_another_manifest(cells, tmp_path):
    other = cells["splits"].copy()
    other.loc[0, "path"] = "/nowhere/cell.BMP"
    with pytest.raises(ValueError, match="not in the manifest"):
        training.cross_validate(tiny_config(), "combined", cells["manifest"], other, tmp_path, progress=False)


def test_train_final_uses_every_cv_cell_for_fixed_epochs(cells, tmp_path):
    bundle = training.train_final(tiny_config(epochs=3), "regression", cells["manifest"], cells["splits"],
                                  tmp_path / "final.pt", epochs=2, progress=True)
    _, extra = load_bundle(tmp_path / "final.pt")
    assert [e["epoch"] for e in extra["history"]] == [1, 2]
    assert bundle.meta["role"] == "final" and bundle.meta["best_epoch"] == 2
    assert bundle.pipeline.name == "regression"
    assert not any(k.startswith("val_") for k in extra["history"][0])


RESUME_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import pandas as pd
    from pap_severity.config import Config
    from pap_severity.training import train_fold

    work = Path(sys.argv[1])
    cfg = Config.model_validate_json((work / "cfg.json").read_text())
    train, val = pd.read_csv(work / "train.csv"), pd.read_csv(work / "val.csv")

    def on_epoch(epoch, metrics):
        if epoch == 1:
            (work / "epoch1.done").write_text("")
            time.sleep(120)  # killed here, after the first epoch's checkpoint

    train_fold(cfg, "combined", train, val, work / "killed.pt", on_epoch=on_epoch, progress=False)
    """
)


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(cells, tmp_path):
    cfg = tiny_config(epochs=2, scheduler="onecycle")  # killed after epoch 1, resumed for epoch 2
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json(by_alias=True))
    cells["train"].to_csv(tmp_path / "train.csv", index=False)
    cells["val"].to_csv(tmp_path / "val.csv", index=False)
    (tmp_path / "run.py").write_text(RESUME_SCRIPT)
    state = training.resume_path(tmp_path / "killed.pt")
    proc = subprocess.Popen([sys.executable, str(tmp_path / "run.py"), str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "epoch1.done").exists():
            if proc.poll() is not None:
                pytest.fail(f"the training subprocess ended early:\n{proc.stdout.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint after 240 s")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert state.is_file() and not (tmp_path / "killed.pt").exists()
    assert load_bundle(state)[1]["epoch"] == 1

    epochs_seen = []
    resumed = training.train_fold(cfg, "combined", cells["train"], cells["val"], tmp_path / "killed.pt",
                                  resume=True, progress=False, on_epoch=lambda e, m: epochs_seen.append(e))
    assert epochs_seen == [2]  # continued after the last completed epoch
    straight = training.train_fold(cfg, "combined", cells["train"], cells["val"], tmp_path / "straight.pt",
                                   progress=False)
    assert_same_history(resumed.history, straight.history)
    assert (resumed.best_epoch, resumed.best_metric) == (straight.best_epoch, straight.best_metric)
    assert_same_weights(weights(resumed.checkpoint), weights(straight.checkpoint), atol=1e-6)
    assert not state.exists()


def test_resume_refuses_a_state_of_other_settings_but_not_of_other_threads(cells, tmp_path):
    class Stop(Exception):
        pass

    def stop(epoch, metrics):
        raise Stop

    with pytest.raises(Stop):
        training.train_fold(tiny_config(), "combined", cells["train"], cells["val"], tmp_path / "m.pt",
                            progress=False, on_epoch=stop)
    # What defines a run (config.RUN_PARAMS): train.amp among them.
    for other in (tiny_config(lr=0.01), tiny_config(amp=False)):
        with pytest.raises(ValueError, match="other settings"):
            training.train_fold(other, "combined", cells["train"], cells["val"], tmp_path / "m.pt",
                                progress=False, resume=True)
    # Where and how fast it runs does not: the run continues.
    seen = []
    training.train_fold(tiny_config(threads=2), "combined", cells["train"], cells["val"], tmp_path / "m.pt",
                        progress=False, resume=True, on_epoch=lambda e, m: seen.append(e))
    assert seen == [2]


def test_mixup_pairs_are_a_seeded_permutation_with_the_own_cell_dominant():
    a = training.mixup_pairs(8, 0.4, np.random.default_rng([0, 1]))
    b = training.mixup_pairs(8, 0.4, np.random.default_rng([0, 1]))
    assert a[0].tolist() == b[0].tolist() and a[1] == b[1]
    assert sorted(a[0].tolist()) == list(range(8)) and 0.5 <= a[1] <= 1.0


def test_the_recipe_options_train_and_change_the_model(synth_set, tmp_path):
    items = training.split_items(synth_set["manifest"], synth_set["splits"])["cv"]
    train, val = items[items["fold"] != 0], items[items["fold"] == 0]
    base = Config()
    base = base.model_copy(update={
        "model": base.model.model_copy(update={"image_size": 32}),
        "train": base.train.model_copy(update={"epochs": 1, "batch_size": 16, "device": "cpu", "threads": 1}),
    })
    recipe = base.model_copy(update={
        "augment": base.augment.model_copy(update={"hed": 0.03, "mixup": 0.4}),
        "loss": base.loss.model_copy(update={"label_smoothing": 0.1}),
    })
    plain = training.train_fold(base, "combined", train, val, tmp_path / "plain.pt", progress=False)
    mixed = training.train_fold(recipe, "combined", train, val, tmp_path / "recipe.pt", progress=False)
    assert np.isfinite(mixed.history[-1]["train_loss"])
    assert mixed.history[-1]["train_loss"] != plain.history[-1]["train_loss"]


def test_repeated_cross_validation_trains_every_repeat_and_fold(cells, tmp_path):

    splits = make_splits(cells["manifest"], SplitConfig(folds=2, test_fraction=0.2, seed=0, repeats=2))
    predictions = training.cross_validate(tiny_config(epochs=1), "combined", cells["manifest"], splits,
                                          tmp_path, progress=False)
    val = predictions[predictions["part"] == "val"]
    for r in (0, 1):  # every cv cell validated once per repeat
        assert sorted(val.loc[val["repeat"] == r, "path"]) == sorted(
            splits.loc[(splits["part"] == "cv") & (splits["repeat"] == r), "path"])
    models = predictions[["repeat", "fold"]].drop_duplicates().apply(tuple, axis=1).tolist()
    assert sorted(models) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r, k in models:
        assert training.fold_checkpoint(tmp_path, "combined", k, r).is_file()
    assert training.fold_checkpoint(tmp_path, "combined", 1, 1).name == "fold1-r1.pt"
    test_cells = splits.loc[splits["part"] == "test", "path"].nunique()
    assert (predictions["part"] == "test").sum() == 4 * test_cells  # the test part once per fold model
