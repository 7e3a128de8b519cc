"""The training loop, checkpoints and resume, cross-validation over the folds.

In the spirit of torchvision's references/classification: one plain loop, no framework.

- Input: the cached, squared cells of `CellDataset`; ImageNet statistics when the
  backbone is ImageNet-initialised, else the channel statistics of the fold's TRAINING
  cells. The `Preprocess` goes into every saved bundle.
- Class imbalance (`train.balance`): per-sample loss weights (`weighted_loss`), a
  weighted sampler with replacement (`sampler`), or nothing (`none`).
- AdamW or SGD (fused kernels); cosine (stepped per epoch), one-cycle (stepped per batch)
  or no schedule; early stopping on a validation metric of `evaluation.compute_metrics`
  (higher is better except mse, mae, macro_mae) with `train.patience`; the best epoch's
  weights are the ones kept. A NaN loss raises `TrainingDiverged`.
- Device: `train.device: auto` picks cuda, then mps, then cpu. On CUDA only: AMP
  (bfloat16 autocast where the GPU has it, else float16 + GradScaler) when `train.amp`, channels_last when
  `train.channels_last` (on CPU it measured slower). `train.threads` sets torch's CPU
  threads for the call (0: torch's default); `train.deterministic` sets torch's
  deterministic algorithms (warn only) and the cuDNN flags.
- Resume: after every epoch the whole training state (weights, optimizer, scheduler,
  AMP scaler, early-stopping state, history, RNG states) is written atomically to
  `<checkpoint>.resume`. The randomness of an epoch (batch order and every cell's
  augmentation) is drawn from (seed, epoch, position) alone, whatever the number of
  workers, so a run resumed after a kill gives the same result as one never killed.
  When training ends the best weights are written to `<checkpoint>` (a plain bundle
  for `checkpoints.load_bundle`, with the history) and the resume file is removed:
  `<checkpoint>` exists only for a finished training.

Epochs are numbered from 1. The per-epoch history holds `epoch`, `train_loss`, `lr`
(the learning rate of the epoch's last step), `val_loss` and `val_<metric>` for every
scalar metric of `compute_metrics`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler, WeightedRandomSampler
from tqdm.auto import tqdm

from pap_severity.checkpoints import ModelBundle, load_bundle, save_bundle
from pap_severity.config import Config
from pap_severity.data.dataset import CellDataset
from pap_severity.devices import amp_dtype, amp_enabled, autocast, channels_last_pays, resolve_device
from pap_severity.evaluation import PREDICTION_COLUMNS, PROB_COLUMNS, STOPPING_METRICS, compute_metrics, is_better
from pap_severity.files import write_json, write_text
from pap_severity.losses import NUM_CLASSES, balanced_class_weights
from pap_severity.models import build_model
from pap_severity.pipelines import Pipeline, get_pipeline
from pap_severity.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocess, augment_transform, channel_stats

RESUME_SUFFIX = ".resume"
PREDICTIONS_FILE = "predictions.csv"
TRAINING_FILE = "training.json"


class TrainingDiverged(RuntimeError):
    """The loss or the model's outputs became NaN or infinite (learning rate too high)."""


@dataclass
class FoldResult:
    fold: int
    checkpoint: Path
    best_epoch: int
    best_metric: float
    history: list[dict]  # per epoch: epoch, train_loss, lr, val_loss, val_<metric>...


# Devices, seeds, determinism ------------------------------------------------------------


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch (all devices); set or clear the deterministic flags."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this before its first use to be deterministic (ignored elsewhere).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def _mix(*values: int) -> int:
    """A well-spread 63-bit seed from a tuple of integers."""
    return int(np.random.SeedSequence(list(values)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


# Data -----------------------------------------------------------------------------------


class _EpochSampler(Sampler):
    """Yields `(index, draw seed)`: the order and every draw's augmentation seed come from
    (seed, epoch) alone, so an epoch is the same whether the run was resumed or not, and
    whatever the number of workers. Weighted draws with replacement when `weights` is given
    (torch's WeightedRandomSampler), else a permutation."""

    def __init__(self, n: int, seed: int, weights: Tensor | None = None) -> None:
        self.n = n
        self.seed = seed
        self.weights = weights
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        if self.weights is None:
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(WeightedRandomSampler(self.weights.double(), self.n, replacement=True, generator=g))
        draws = torch.randint(0, 2**62, (self.n,), generator=g).tolist()
        return iter(zip(order, draws))


class _SeededView(Dataset):
    """`view[(i, seed)]` seeds torch's CPU generator (the one torchvision's random transforms
    draw from) with `seed`, then returns `dataset[i]`."""

    def __init__(self, dataset: CellDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        torch.default_generator.manual_seed(seed)
        return self.dataset[index]


def _check_items(items: pd.DataFrame, what: str) -> tuple[list[str], list[int]]:
    missing = {"path", "severity"} - set(items.columns)
    if missing:
        raise ValueError(f"{what} lack columns {sorted(missing)}")
    if items.empty:
        raise ValueError(f"no {what}")
    if items["severity"].isna().any():
        raise ValueError(f"{what} hold cells without a severity")
    severity = items["severity"].astype(int)
    if not severity.between(0, NUM_CLASSES - 1).all():
        raise ValueError(f"{what} hold severities outside 0..{NUM_CLASSES - 1}")
    return items["path"].astype(str).tolist(), severity.tolist()


def _datasets(cfg: Config, train_items: pd.DataFrame, val_items: pd.DataFrame | None):
    """The augmented training set, the plain validation set (or None) and their Preprocess."""
    paths, labels = _check_items(train_items, "training items")
    size = cfg.model.image_size
    imagenet = Preprocess(size, IMAGENET_MEAN, IMAGENET_STD)
    train = CellDataset(paths, labels, imagenet, cfg.augment)
    if cfg.model.weights == "imagenet":
        pre = imagenet
    else:
        # The statistics of this fold's training cells, from the images the set already holds.
        mean, std = channel_stats(train.images)
        pre = Preprocess(size, mean, std)
        train.transform = augment_transform(pre, cfg.augment)
    val = None
    if val_items is not None:
        val = CellDataset(*_check_items(val_items, "validation items"), pre, None)
    return train, val, pre


def _loader_kwargs(cfg: Config, device: torch.device) -> dict:
    workers = cfg.train.workers
    return {
        "num_workers": workers,
        "persistent_workers": workers > 0,
        "pin_memory": device.type == "cuda",
    }


# One epoch ------------------------------------------------------------------------------


def _to_input(x: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def mixup_pairs(n: int, alpha: float, rng: np.random.Generator) -> tuple[Tensor, float]:
    """Mixup's partners and weight for a batch of n: a permutation and lam ~ Beta(alpha, alpha),
    folded to lam >= 0.5 so that each mixed cell stays closest to its own label."""
    lam = float(rng.beta(alpha, alpha))
    return torch.from_numpy(rng.permutation(n)), max(lam, 1.0 - lam)


def _train_epoch(model, loader, pipeline: Pipeline, cfg: Config, optimizer, scheduler, scaler,
                 class_weights: Tensor | None, device, amp: bool, channels_last: bool, bar,
                 mix_rng: np.random.Generator | None = None) -> tuple[float, float]:
    """One pass over the training cells: (mean loss, learning rate of the last step)."""
    model.train()
    total, count, lr = 0.0, 0, optimizer.param_groups[0]["lr"]
    for x, y in loader:
        x = _to_input(x, device, channels_last)
        y = y.to(device, non_blocking=True)
        weight = class_weights[y] if class_weights is not None else None
        if mix_rng is not None:
            partner, lam = mixup_pairs(len(y), cfg.augment.mixup, mix_rng)
            partner = partner.to(device)
            x = lam * x + (1 - lam) * x[partner]
        with autocast(device, amp):
            out = model(x)
        loss = pipeline.loss(out.float(), y, cfg.loss, weight)
        if mix_rng is not None:
            partner_weight = weight[partner] if weight is not None else None
            loss = lam * loss + (1 - lam) * pipeline.loss(out.float(), y[partner], cfg.loss, partner_weight)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"the training loss became {loss.item()}; lower train.lr (now {cfg.train.lr:g})")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        lr = optimizer.param_groups[0]["lr"]
        scaler.step(optimizer)
        scaler.update()
        if cfg.train.scheduler == "onecycle":
            scheduler.step()
        total += loss.item() * len(y)
        count += len(y)
        bar.update(1)
        bar.set_postfix_str(_postfix(bar, loss=loss.item()), refresh=False)
    return total / max(count, 1), lr


@torch.no_grad()
def _predict(model: nn.Module, loader, device, channels_last: bool, amp: bool = False) -> Tensor:
    """The model's raw outputs over a loader of (image, label), on the CPU, float32."""
    model.eval()
    outs = []
    for x, _ in loader:
        with autocast(device, amp):
            outs.append(model(_to_input(x, device, channels_last)).float().cpu())
    return torch.cat(outs)


def _evaluate(model, loader, pipeline: Pipeline, cfg: Config, device, amp: bool, channels_last: bool) -> dict:
    """Validation loss and the scalar metrics of compute_metrics (un-prefixed)."""
    outputs = _predict(model, loader, device, channels_last, amp)
    if not torch.isfinite(outputs).all():
        raise TrainingDiverged(f"the model's outputs became NaN or infinite; lower train.lr (now {cfg.train.lr:g})")
    y = loader.dataset.severities
    pred = pipeline.decode(outputs)
    metrics = compute_metrics(y.numpy(), pred.probs.numpy(), pred.label.numpy(), pred.score.numpy())
    scalars = {k: float(v) for k, v in metrics.items() if k in STOPPING_METRICS}
    scalars["loss"] = float(pipeline.loss(outputs, y, cfg.loss, None))
    return scalars


def _postfix(bar, **values) -> str:
    state = getattr(bar, "_pap_state", {})
    state.update(values)
    bar._pap_state = state
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in state.items())


# Optimizer, schedule --------------------------------------------------------------------


def _optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    t = cfg.train
    # The fused kernels (CPU, CUDA, MPS) update all parameters in one call: on CPU the
    # per-tensor default takes as long as a resnet18 backward pass at 64 px.
    fused = {"fused": True} if params[0].device.type in ("cpu", "cuda", "mps") else {}
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, **fused)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, **fused)


def _scheduler(cfg: Config, optimizer, epochs: int, steps_per_epoch: int):
    if cfg.train.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if cfg.train.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.train.lr, total_steps=epochs * steps_per_epoch
        )
    return None


# State for resume -----------------------------------------------------------------------


def resume_path(checkpoint: str | Path) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + RESUME_SUFFIX)


def _fingerprint(cfg: Config, pipeline: str, train_items, val_items, epochs: int) -> str:
    """What a resumed or reused training must share with the one that wrote the file."""
    settings = {
        "pipeline": pipeline,
        "epochs": epochs,
        "model": cfg.model.model_dump(mode="json"),
        "augment": cfg.augment.model_dump(mode="json"),
        "loss": cfg.loss.model_dump(mode="json", by_alias=True),
        "train": cfg.train.model_dump(mode="json", exclude={"pipelines", "workers", "device", "epochs", "threads"}),
        "train_items": _items_key(train_items),
        "val_items": _items_key(val_items) if val_items is not None else None,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _items_key(items: pd.DataFrame) -> list:
    return sorted(zip(items["path"].astype(str), items["severity"].astype(int).tolist()))


def _rng_states() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _bundle(model, pipeline: Pipeline, cfg: Config, pre: Preprocess, meta: dict) -> ModelBundle:
    return ModelBundle(model=model, pipeline=pipeline, arch=cfg.model.arch, preprocess=pre, meta=meta)


def _finished(checkpoint: Path, fingerprint: str) -> dict | None:
    """The extra state of a finished training at `checkpoint` made with the same settings."""
    if not checkpoint.is_file():
        return None
    try:
        _, extra = load_bundle(checkpoint)
    except ValueError:
        return None
    if extra.get("complete") and extra.get("fingerprint") == fingerprint:
        return extra
    return None


# The loop -------------------------------------------------------------------------------


def _fit(cfg: Config, pipeline_name: str, train_items: pd.DataFrame, val_items: pd.DataFrame | None,
         checkpoint: Path, **kwargs) -> FoldResult:
    threads = torch.get_num_threads()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        return _fit_in(cfg, pipeline_name, train_items, val_items, Path(checkpoint), **kwargs)
    finally:
        torch.set_num_threads(threads)


def _fit_in(cfg: Config, pipeline_name: str, train_items: pd.DataFrame, val_items: pd.DataFrame | None,
            checkpoint: Path, *, epochs: int, resume: bool, on_epoch, progress: bool, fold: int,
            tracker=None, meta: dict | None = None) -> FoldResult:
    t = cfg.train
    metric = t.early_stopping_metric
    if val_items is not None and metric not in STOPPING_METRICS:
        raise ValueError(
            f"train.early_stopping_metric {metric!r} is not a metric; choose from {', '.join(sorted(STOPPING_METRICS))}"
        )
    pipeline = get_pipeline(pipeline_name)
    fingerprint = _fingerprint(cfg, pipeline_name, train_items, val_items, epochs)
    state_file = resume_path(checkpoint)

    if resume and (done := _finished(checkpoint, fingerprint)) is not None:
        return FoldResult(fold, checkpoint, done["best_epoch"], done["best_metric"], done["history"])

    device = resolve_device(t.device)
    amp = amp_enabled(device, t.amp)
    seed_everything(t.seed, t.deterministic)
    train_set, val_set, pre = _datasets(cfg, train_items, val_items)

    labels = train_set.severities
    class_weights = balanced_class_weights(labels)
    sampler = _EpochSampler(len(train_set), t.seed, class_weights[labels] if t.balance == "sampler" else None)
    loss_weights = class_weights.to(device) if t.balance == "weighted_loss" else None
    kwargs = _loader_kwargs(cfg, device)
    # BatchNorm cannot train on a batch of one: drop a last batch that would hold one cell.
    drop_last = len(train_set) % t.batch_size == 1
    train_loader = DataLoader(_SeededView(train_set), batch_size=t.batch_size, sampler=sampler,
                              drop_last=drop_last, generator=torch.Generator().manual_seed(t.seed), **kwargs)
    val_loader = None
    if val_set is not None:
        val_loader = DataLoader(val_set, batch_size=max(t.batch_size, 64), shuffle=False, **kwargs)
    steps = len(train_loader)
    if steps == 0:
        raise ValueError(f"{len(train_set)} training cells give no full batch; lower train.batch_size")

    torch.manual_seed(t.seed)  # the initial weights depend on the seed alone
    model = build_model(cfg.model.arch, cfg.model.weights, pipeline.head).to(device)
    channels_last = t.channels_last and channels_last_pays(device, amp)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = _optimizer(cfg, model)
    scheduler = _scheduler(cfg, optimizer, epochs, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype(device) == torch.float16)

    start, history = 1, []
    best_value: float | None = None
    best_epoch, since_best = 0, 0
    best_state: dict | None = None
    if resume and state_file.is_file():
        saved, extra = load_bundle(state_file)
        if extra.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{state_file} was written by a training with other settings or cells; "
                "delete it or train without resume"
            )
        model.load_state_dict(saved.model.state_dict())
        optimizer.load_state_dict(extra["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(extra["scheduler"])
        scaler.load_state_dict(extra["scaler"])
        history = extra["history"]
        start = extra["epoch"] + 1
        best_value, best_epoch, since_best = extra["best_value"], extra["best_epoch"], extra["since_best"]
        best_state = extra["best_state"]
        if best_state is None and best_epoch == extra["epoch"]:  # the saved weights are the best ones
            best_state = _cpu_state(model)
        _set_rng_states(extra["rng"])
        pre = saved.preprocess

    desc = f"{pipeline_name} fold {fold}" if val_items is not None else f"{pipeline_name} final"
    bar = tqdm(total=epochs * steps, initial=(start - 1) * steps, desc=desc, unit="batch",
               disable=not progress, leave=True, dynamic_ncols=True)
    try:
        epoch = start
        while epoch <= epochs and not (val_loader is not None and since_best >= t.patience):
            sampler.set_epoch(epoch)
            _postfix(bar, epoch=f"{epoch}/{epochs}")
            mix_rng = np.random.default_rng([t.seed, epoch]) if cfg.augment.mixup > 0 else None
            train_loss, lr = _train_epoch(model, train_loader, pipeline, cfg, optimizer, scheduler, scaler,
                                          loss_weights, device, amp, channels_last, bar, mix_rng)
            if t.scheduler == "cosine":
                scheduler.step()
            entry: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss, "lr": lr}
            metrics: dict[str, float] = {}
            if val_loader is not None:
                metrics = _evaluate(model, val_loader, pipeline, cfg, device, amp, channels_last)
                entry.update({f"val_{k}": v for k, v in metrics.items()})
                if is_better(metric, metrics[metric], best_value):
                    best_value, best_epoch, since_best = metrics[metric], epoch, 0
                    best_state = None  # this epoch's weights: taken below
                else:
                    since_best += 1
            else:
                best_epoch, best_state = epoch, None
            if best_state is None and best_epoch == epoch:
                best_state = _cpu_state(model)
            history.append(entry)
            shown = {"loss": train_loss}
            if metrics:
                shown[f"val_{metric}"] = metrics[metric]
            bar.set_postfix_str(_postfix(bar, **shown))
            if tracker is not None:
                tracker.log_epoch(entry, step=epoch)
            save_bundle(
                _bundle(model, pipeline, cfg, pre, dict(meta or {})),
                state_file,
                fingerprint=fingerprint,
                epoch=epoch,
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict() if scheduler is not None else None,
                scaler=scaler.state_dict(),
                history=history,
                best_value=best_value,
                best_epoch=best_epoch,
                since_best=since_best,
                # When this epoch is the best, the weights above are the best ones.
                best_state=None if best_epoch == epoch else best_state,
                rng=_rng_states(),
                complete=False,
            )
            if on_epoch is not None:
                on_epoch(epoch, metrics)
            epoch += 1
    finally:
        bar.close()

    if best_state is None:  # no epoch had a defined metric: keep the last weights
        best_epoch, best_state = history[-1]["epoch"], _cpu_state(model)
    model.load_state_dict(best_state)
    best_metric = float(best_value) if best_value is not None else float("nan")
    info = {
        **(meta or {}),
        "fold": fold,
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "early_stopping_metric": metric if val_items is not None else None,
        "best_metric": best_metric,
    }
    save_bundle(
        _bundle(model, pipeline, cfg, pre, info),
        checkpoint,
        complete=True,
        fingerprint=fingerprint,
        best_epoch=best_epoch,
        best_metric=best_metric,
        history=history,
    )
    state_file.unlink(missing_ok=True)
    return FoldResult(fold, checkpoint, best_epoch, best_metric, history)


def train_fold(
    cfg: Config,
    pipeline: str,
    train_items: pd.DataFrame,
    val_items: pd.DataFrame,
    checkpoint: Path,
    *,
    resume: bool = False,
    on_epoch: Callable[[int, dict], None] | None = None,
    progress: bool = True,
    fold: int = 0,
    tracker=None,
) -> FoldResult:
    """Train one model on `train_items`, early-stopped on `val_items`; the best epoch's weights
    are saved at `checkpoint` (a bundle for `load_bundle`, with the history in its extra).

    items: DataFrames with columns path, severity (0..4). `on_epoch(epoch, metrics)` runs after
    each epoch with the validation metrics (keys of compute_metrics plus `loss`); an exception
    it raises (optuna.TrialPruned) propagates, the epoch's state already saved. `resume=True`
    continues from `<checkpoint>.resume`, or returns a finished training at `checkpoint` made
    with the same settings and cells without training again. `tracker` (tracking.Tracker,
    optional) gets every epoch's history entry.
    """
    return _fit(cfg, pipeline, train_items, val_items, checkpoint, epochs=cfg.train.epochs, resume=resume,
                on_epoch=on_epoch, progress=progress, fold=fold, tracker=tracker,
                meta={"pipeline": pipeline, "role": "cv"})


def train_final(
    cfg: Config,
    pipeline: str,
    manifest: pd.DataFrame,
    splits: pd.DataFrame,
    checkpoint: Path,
    *,
    epochs: int | None = None,
    progress: bool = True,
    resume: bool = False,
) -> ModelBundle:
    """Train on every cv cell (all folds) for a fixed number of epochs (default
    train.epochs), without validation nor early stopping: the model for the registry."""
    cv = split_items(manifest, splits)["cv"]
    _fit(cfg, pipeline, cv, None, Path(checkpoint), epochs=epochs or cfg.train.epochs, resume=resume,
         on_epoch=None, progress=progress, fold=-1, meta={"pipeline": pipeline, "role": "final"})
    return load_bundle(checkpoint)[0]


# Prediction and cross-validation ----------------------------------------------------------


def predict_items(bundle: ModelBundle, items: pd.DataFrame, batch_size: int = 64) -> pd.DataFrame:
    """Columns path, severity, pred (0..4), score, p0..p4, one row per cell of `items`, in order.

    The model runs on the device its weights are on; `severity` is copied from `items`
    (missing when `items` has none)."""
    paths = items["path"].astype(str).tolist()
    table = pd.DataFrame({"path": paths})
    table["severity"] = items["severity"].to_numpy() if "severity" in items.columns else pd.NA
    if not paths:
        return table.assign(pred=pd.Series(dtype=int), score=pd.Series(dtype=float),
                            **{c: pd.Series(dtype=float) for c in PROB_COLUMNS})
    dataset = CellDataset(paths, [0] * len(paths), bundle.preprocess, None)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    device = next(bundle.model.parameters()).device
    pred = bundle.pipeline.decode(_predict(bundle.model, loader, device, channels_last=False))
    table["pred"] = pred.label.numpy().astype(int)
    table["score"] = pred.score.numpy().astype(float)
    for k, column in enumerate(PROB_COLUMNS):
        table[column] = pred.probs[:, k].numpy().astype(float)
    return table


def split_items(manifest: pd.DataFrame, splits: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The cv, calib and test rows of splits (path, sha256 when present, severity, part, fold), checked
    against the manifest; a part the splits lack is an empty frame."""
    missing = {"path", "severity", "part", "fold"} - set(splits.columns)
    if missing:
        raise ValueError(f"splits table lacks columns {sorted(missing)}")
    unknown = set(splits["path"].astype(str)) - set(manifest["path"].astype(str))
    if unknown:
        raise ValueError(
            f"{len(unknown)} cells of the splits are not in the manifest (e.g. {sorted(unknown)[0]}); "
            "rebuild the splits from this manifest (`pap-severity data split`)"
        )
    rows = splits.loc[:, [c for c in ("path", "sha256", "severity", "part", "fold") if c in splits.columns]].copy()
    rows["severity"] = rows["severity"].astype(int)
    rows["fold"] = rows["fold"].astype(int)
    parts = {part: rows[rows["part"] == part].reset_index(drop=True) for part in ("cv", "calib", "test")}
    if parts["cv"].empty:
        raise ValueError("the splits hold no cv cells to train on")
    return parts


def pipeline_dir(out_dir: str | Path, pipeline: str) -> Path:
    """Where cross_validate writes a pipeline's fold models, predictions and run ids."""
    return Path(out_dir) / pipeline


def fold_checkpoint(out_dir: str | Path, pipeline: str, fold: int) -> Path:
    return pipeline_dir(out_dir, pipeline) / f"fold{fold}.pt"


def _example_input(dataset: CellDataset, n: int = 2) -> np.ndarray:
    """A few preprocessed cells as a float32 array: the input example logged with a model."""
    return torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))]).numpy().astype(np.float32)


def cross_validate(
    cfg: Config,
    pipeline: str,
    manifest: pd.DataFrame,
    splits: pd.DataFrame,
    out_dir: Path,
    *,
    resume: bool = False,
    tracker=None,
    progress: bool = True,
) -> pd.DataFrame:
    """One model per cv fold (that fold validates and early-stops it), each predicted on its
    validation fold and on the held-out test part.

    Writes under `out_dir/<pipeline>/`: `fold<k>.pt` (bundles), `predictions.csv` (columns
    pipeline, fold, part (val|calib|test), path, severity, pred, score, p0..p4: returned too),
    `training.json` (per fold: best epoch, metrics, history) and, with a tracker
    (tracking.Tracker), `mlflow_runs.json` (parent and fold run ids, model URIs).
    `resume=True` reuses finished folds and continues an interrupted one, in the same
    MLflow runs.
    """
    get_pipeline(pipeline)
    parts = split_items(manifest, splits)
    cv, calib, test = parts["cv"], parts["calib"], parts["test"]
    folds = sorted(int(k) for k in cv["fold"].unique() if k >= 0)
    if len(folds) < 2:
        raise ValueError(f"the splits hold {len(folds)} cv fold(s); cross-validation needs at least 2")
    out = pipeline_dir(out_dir, pipeline)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.train.device)
    runs = _RunIds(out, pipeline, tracker, resume)

    tables, summary, fold_metrics = [], {}, []
    with runs.pipeline_run():
        for k in folds:
            with runs.fold_run(k):
                train_items, val_items = cv[cv["fold"] != k], cv[cv["fold"] == k]
                result = train_fold(cfg, pipeline, train_items, val_items, fold_checkpoint(out_dir, pipeline, k),
                                    resume=resume, progress=progress, fold=k, tracker=tracker)
                bundle, _ = load_bundle(result.checkpoint, map_location=device)
                metrics = {}
                for part, items in (("val", val_items), ("calib", calib), ("test", test)):
                    if items.empty:
                        continue
                    table = predict_items(bundle, items)
                    table.insert(0, "part", part)
                    table.insert(0, "fold", k)
                    table.insert(0, "pipeline", pipeline)
                    tables.append(table)
                    m = compute_metrics(table["severity"].to_numpy(), table[PROB_COLUMNS].to_numpy(),
                                        table["pred"].to_numpy(), table["score"].to_numpy())
                    metrics.update({f"{part}_{name}": float(v) for name, v in m.items() if name in STOPPING_METRICS})
                fold_metrics.append(metrics)
                summary[str(k)] = {"best_epoch": result.best_epoch, "best_metric": result.best_metric,
                                   "metrics": metrics, "history": result.history}
                if tracker is not None:
                    runs.backfill_history(k, result.history)
                if tracker is not None and not runs.fold_logged(k):
                    # "best_val_*": the kept model on its validation fold (the per-epoch curves are val_*).
                    final = {("best_" + key if key.startswith("val_") else key): v for key, v in metrics.items()}
                    tracker.log_metrics({"best_epoch": result.best_epoch, **final})
                    examples = CellDataset(val_items["path"].astype(str).tolist()[:2],
                                           val_items["severity"].astype(int).tolist()[:2], bundle.preprocess, None)
                    runs.log_model(k, bundle, _example_input(examples))
        if tracker is not None:
            means = pd.DataFrame(fold_metrics).mean(numeric_only=True)
            tracker.log_metrics({f"{name}_mean": float(v) for name, v in means.items()})

    predictions = pd.concat(tables, ignore_index=True).loc[:, list(PREDICTION_COLUMNS)]
    write_text(out / PREDICTIONS_FILE, predictions.to_csv(index=False))
    write_json(summary, out / TRAINING_FILE)
    return predictions


class _RunIds:
    """The MLflow runs of one cross-validation, written to `mlflow_runs.json` as they are made,
    so that a resumed cross-validation (and the evaluate stage) reopens the same runs."""

    def __init__(self, out: Path, pipeline: str, tracker, resume: bool) -> None:
        self.tracker = tracker
        self.pipeline = pipeline
        self.data: dict = {}
        if tracker is None:
            return
        from pap_severity.tracking import RUNS_FILE, read_runs

        self.path = out / RUNS_FILE
        if resume and self.path.is_file():
            saved = read_runs(self.path)
            if saved.get("pipeline") == pipeline and saved.get("experiment_id") == tracker.experiment_id:
                self.data = saved

    @contextmanager
    def pipeline_run(self):
        if self.tracker is None:
            yield None
            return
        with self.tracker.pipeline_run(self.pipeline, run_id=self.data.get("parent_run_id")) as run_id:
            self.data.update(pipeline=self.pipeline, experiment_id=self.tracker.experiment_id,
                             parent_run_id=run_id)
            self._save()
            yield run_id

    @contextmanager
    def fold_run(self, k: int):
        if self.tracker is None:
            yield None
            return
        fold = self._fold(k)
        with self.tracker.fold_run(k, run_id=fold.get("run_id")) as run_id:
            fold["run_id"] = run_id
            self._save()
            yield run_id

    def backfill_history(self, k: int, history: list[dict]) -> None:
        """Log the epochs of a fold trained before this run existed (finished without tracking)."""
        run = self.tracker.client.get_run(self._fold(k)["run_id"])
        if "train_loss" not in run.data.metrics:
            for entry in history:
                self.tracker.log_epoch(entry, step=entry["epoch"])

    def fold_logged(self, k: int) -> bool:
        """Whether fold k's final metrics and model were logged (before an interruption)."""
        return bool(self._fold(k).get("model_uri"))

    def log_model(self, k: int, bundle: ModelBundle, example: np.ndarray) -> None:
        self._fold(k)["model_uri"] = self.tracker.log_model(bundle, input_example=example)
        self._save()

    def _fold(self, k: int) -> dict:
        return self.data.setdefault("folds", {}).setdefault(str(k), {})

    def _save(self) -> None:
        from pap_severity.tracking import write_runs

        write_runs(self.path, self.data)


__all__ = [
    "FoldResult",
    "TrainingDiverged",
    "cross_validate",
    "fold_checkpoint",
    "is_better",
    "pipeline_dir",
    "predict_items",
    "resolve_device",
    "resume_path",
    "seed_everything",
    "train_final",
    "train_fold",
]
