"""Training: one plain loop in the shape of torchvision's references/classification/train.py.

How a training runs (`train_fold`, `train_final`, both through `_fit`):

1. `setup_training` builds everything from the config: the datasets (the cached, squared
   cells of `CellDataset`; ImageNet statistics when the backbone is ImageNet-initialised,
   else the channel statistics of the TRAINING cells), the loaders, the model (its initial
   weights depend on train.seed alone), the optimizer (AdamW or SGD, fused kernels), the
   schedule (cosine stepped per epoch, one-cycle per batch, or none) and the AMP scaler.
   It returns a `TrainState` (what changes from epoch to epoch) and a `TrainContext` (what
   does not: loss settings, device, precision, class weights, mixup).
2. With `resume`, `TrainState.load` reads `<checkpoint>.resume` back into that state.
3. Each epoch: `train_one_epoch` (one pass, the schedule advanced), `evaluate` on the
   validation cells (the scalar metrics of `evaluation.compute_metrics` plus `loss`),
   `TrainState.end_epoch` (history, early stopping on train.early_stopping_metric with
   train.patience, the best epoch's weights kept), `TrainState.save` (atomically, the whole
   state), then the caller's hooks. A NaN loss or output raises `TrainingDiverged`.
4. `TrainState.finish` puts the best epoch's weights back and writes `<checkpoint>`: a plain
   bundle for `checkpoints.load_bundle` (explain, registry and serving read it) with the
   history; the resume file is removed, so `<checkpoint>` exists only for a finished training.

Choices, and why:
- Class imbalance (`train.balance`): per-sample loss weights (`weighted_loss`), a weighted
  sampler with replacement (`sampler`), or nothing (`none`).
- Exact resume: the randomness of an epoch (batch order, every cell's augmentation, the
  mixup partners) is drawn from (seed, epoch, position) alone (`EpochSampler`, and
  `np.random.default_rng([seed, epoch])` for mixup), whatever the number of workers, so a
  run resumed after a kill gives the same weights as one never killed. A resume file or a
  finished checkpoint is reused only when its fingerprint matches: `config.run_definition`
  (what defines a run, shared with the tuning study), the pipeline, the epochs and the cells.
- Device (`train.device: auto` picks cuda, then mps, then cpu) and precision come from
  `pap_severity.devices`: `train.amp` autocasts in bf16 on CUDA and on CPUs with native bf16
  (float16 + GradScaler on GPUs without bf16); `train.channels_last` where it pays.
  `train.threads` sets torch's CPU threads for the call (0: torch's default);
  `train.deterministic` sets torch's deterministic algorithms (warn only) and the cuDNN flags.
- `cross_validate` trains one model per fold and predicts its validation fold and the test
  part. It reports its progress to a `CVCallbacks` observer; `tracking.CVRuns` mirrors it in
  MLflow. Nothing here imports MLflow or Optuna.
- With PAP_SEVERITY_COMPUTE_LOG naming a file, every training epoch and prediction pass appends
  one JSON line of the seconds spent in forward, backward and optimizer steps
  (benchmarks/pipeline_overhead.py sets it to tell compute from machinery); unset, nothing is timed.

Epochs are numbered from 1. The per-epoch history holds `epoch`, `train_loss`, `lr` (the
learning rate of the epoch's last step), `val_loss` and `val_<metric>` for every scalar
metric of `compute_metrics`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler, WeightedRandomSampler
from tqdm import tqdm

from pap_severity.checkpoints import ModelBundle, load_bundle, save_bundle
from pap_severity.config import Config, LossConfig, run_definition
from pap_severity.data.dataset import CellDataset
from pap_severity.data.splits import cv_pairs, held_out
from pap_severity.devices import ComputeClock, amp_dtype, amp_enabled, autocast, channels_last_pays, resolve_device
from pap_severity.evaluation import (PREDICTION_COLUMNS, PREDICTIONS_FILE, PROB_COLUMNS, STOPPING_METRICS, compute_metrics,
                                     is_better, pipeline_dir)
from pap_severity.files import write_json, write_text
from pap_severity.losses import NUM_CLASSES, balanced_class_weights
from pap_severity.models import build_model
from pap_severity.progress import progress_bar
from pap_severity.pipelines import get_pipeline
from pap_severity.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocess, augment_transform, channel_stats

RESUME_SUFFIX = ".resume"
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


# Seeds and determinism ------------------------------------------------------------------


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


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op CPU threads set to n (0: unchanged) for the block."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


# Data -----------------------------------------------------------------------------------


class EpochSampler(Sampler):
    """Yields `(index, draw seed)`: the order and every draw's augmentation seed come from
    (seed, epoch) alone, so an epoch is the same whether the run was resumed or not, and
    whatever the number of workers. Weighted draws with replacement when `weights` (one per
    cell) is given (torch's WeightedRandomSampler), else a permutation."""

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


def _loaders(cfg: Config, train: CellDataset, val: CellDataset | None, sampler: EpochSampler,
             device: torch.device) -> tuple[DataLoader, DataLoader | None]:
    t = cfg.train
    kwargs = {"num_workers": t.workers, "persistent_workers": t.workers > 0, "pin_memory": device.type == "cuda"}
    # BatchNorm cannot train on a batch of one: drop a last batch that would hold one cell.
    drop_last = len(train) % t.batch_size == 1
    train_loader = DataLoader(_SeededView(train), batch_size=t.batch_size, sampler=sampler, drop_last=drop_last,
                              generator=torch.Generator().manual_seed(t.seed), **kwargs)
    if len(train_loader) == 0:
        raise ValueError(f"{len(train)} training cells give no full batch; lower train.batch_size")
    val_loader = None
    if val is not None:
        val_loader = DataLoader(val, batch_size=max(t.batch_size, 64), shuffle=False, **kwargs)
    return train_loader, val_loader


# The state of a training: the checkpoint ----------------------------------------------------


@dataclass(frozen=True)
class TrainContext:
    """What stays fixed over one training: how every epoch runs. Rebuilt from the config, not saved."""

    loss: LossConfig
    device: torch.device
    amp: bool  # autocast (devices.amp_dtype)
    channels_last: bool
    class_weights: Tensor | None  # one per class, on `device`, for train.balance weighted_loss; else None
    mixup: float  # Beta(a, a) of mixup; 0: off
    seed: int


@dataclass
class TrainState:
    """Everything a training carries from one epoch to the next; it IS the resume checkpoint
    (`save`, `load`): the model (as the bundle it will be saved as), the optimizer, schedule
    and AMP scaler, the epochs done (the sampler's position: epoch e draws from (seed, e)),
    the early-stopping state and the best epoch's weights, the history, and the fingerprint
    of the run it belongs to. The process's RNG states are saved with it and restored."""

    bundle: ModelBundle
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler
    fingerprint: str
    epoch: int = 0  # epochs finished; the next one is epoch + 1
    best_value: float | None = None
    best_epoch: int = 0
    since_best: int = 0
    best_weights: dict[str, Tensor] | None = None  # CPU copy of the best epoch's weights
    history: list[dict] = field(default_factory=list)

    _SAVED_AS_IS = ("epoch", "best_value", "best_epoch", "since_best", "history")

    def end_epoch(self, entry: dict, metric: str | None) -> None:
        """Record a finished epoch's history entry. With a stopping metric, an epoch whose
        `val_<metric>` improves on the best so far becomes the best (its weights kept), any
        other one counts towards the patience; without one, every epoch is the best."""
        self.epoch = entry["epoch"]
        self.history.append(entry)
        if metric is not None:
            if not is_better(metric, entry[f"val_{metric}"], self.best_value):
                self.since_best += 1
                return
            self.best_value = entry[f"val_{metric}"]
        self.best_epoch, self.since_best = self.epoch, 0
        self.best_weights = _cpu_state(self.bundle.model)

    def stopped(self, patience: int) -> bool:
        """Whether `patience` epochs in a row brought no improvement."""
        return self.since_best >= patience

    def save(self, path: Path) -> None:
        """Write the whole state atomically (a bundle for `load_bundle`, the rest in its extra)."""
        save_bundle(
            self.bundle,
            path,
            fingerprint=self.fingerprint,
            **{name: getattr(self, name) for name in self._SAVED_AS_IS},
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict() if self.scheduler is not None else None,
            scaler=self.scaler.state_dict(),
            # When the last epoch is the best, the bundle's weights are the best ones: not stored twice.
            best_weights=None if self.best_epoch == self.epoch else self.best_weights,
            rng=_rng_states(),
            complete=False,
        )

    def load(self, path: Path) -> None:
        """Read a state written by `save` into this one (its model, optimizer, schedule, scaler in
        place) and restore the process's RNG states; refuses a state of another fingerprint."""
        saved, extra = load_bundle(path)
        if extra.get("fingerprint") != self.fingerprint:
            raise ValueError(f"{path} was written by a training with other settings or cells; "
                             "delete it or train without resume")
        self.bundle.model.load_state_dict(saved.model.state_dict())
        self.bundle.preprocess, self.bundle.meta = saved.preprocess, saved.meta
        self.optimizer.load_state_dict(extra["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(extra["scheduler"])
        self.scaler.load_state_dict(extra["scaler"])
        for name in self._SAVED_AS_IS:
            setattr(self, name, extra[name])
        self.best_weights = extra["best_weights"]
        if self.best_weights is None and self.best_epoch == self.epoch:
            self.best_weights = _cpu_state(self.bundle.model)
        _set_rng_states(extra["rng"])

    def finish(self, checkpoint: Path, meta: dict) -> None:
        """Put the best epoch's weights (the last ones when no epoch had a defined metric) in the
        model and write it at `checkpoint` as a finished bundle, its meta `meta` plus best_epoch,
        epochs_run and best_metric; remove the resume file."""
        if self.best_weights is None:
            self.best_epoch, self.best_weights = self.epoch, _cpu_state(self.bundle.model)
        self.bundle.model.load_state_dict(self.best_weights)
        self.bundle.meta = {**meta, "best_epoch": self.best_epoch, "epochs_run": len(self.history),
                            "best_metric": self.best_metric}
        save_bundle(self.bundle, checkpoint, complete=True, fingerprint=self.fingerprint,
                    best_epoch=self.best_epoch, best_metric=self.best_metric, history=self.history)
        resume_path(checkpoint).unlink(missing_ok=True)

    @property
    def best_metric(self) -> float:
        return float(self.best_value) if self.best_value is not None else float("nan")


def _finished(checkpoint: Path, fingerprint: str) -> dict | None:
    """best_epoch, best_metric and history of a finished training at `checkpoint` of the same fingerprint."""
    if not checkpoint.is_file():
        return None
    try:
        _, extra = load_bundle(checkpoint)
    except ValueError:
        return None
    if extra.get("complete") and extra.get("fingerprint") == fingerprint:
        return {key: extra[key] for key in ("best_epoch", "best_metric", "history")}
    return None


def resume_path(checkpoint: str | Path) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + RESUME_SUFFIX)


def _fingerprint(cfg: Config, pipeline: str, epochs: int, train_items: pd.DataFrame,
                 val_items: pd.DataFrame | None) -> str:
    """What a resumed or reused training must share with the one that wrote the file: the run
    definition (config.run_definition), the pipeline, the epochs it runs and its cells."""
    settings = {
        "run": run_definition(cfg),
        "pipeline": pipeline,
        "epochs": epochs,
        "train_items": _items_key(train_items),
        "val_items": _items_key(val_items) if val_items is not None else None,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _items_key(items: pd.DataFrame) -> list:
    return sorted(zip(items["path"].astype(str), items["severity"].astype(int).tolist()))


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


# Setup ------------------------------------------------------------------------------------


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


def setup_training(cfg: Config, pipeline: str, train_items: pd.DataFrame, val_items: pd.DataFrame | None, *,
                   epochs: int, meta: dict | None = None,
                   ) -> tuple[TrainState, TrainContext, DataLoader, DataLoader | None]:
    """A fresh training of `pipeline` on the cells of `train_items` (validated on `val_items`,
    or None): its state before the first epoch, its context, the training loader (its sampler
    an `EpochSampler`) and the validation loader. Seeds the process (train.seed)."""
    t = cfg.train
    spec = get_pipeline(pipeline)  # its head, loss and decoder
    device = resolve_device(t.device)
    amp = amp_enabled(device, t.amp)
    seed_everything(t.seed, t.deterministic)
    train_set, val_set, pre = _datasets(cfg, train_items, val_items)
    labels = train_set.severities
    class_weights = balanced_class_weights(labels)
    sampler = EpochSampler(len(train_set), t.seed, class_weights[labels] if t.balance == "sampler" else None)
    train_loader, val_loader = _loaders(cfg, train_set, val_set, sampler, device)

    torch.manual_seed(t.seed)  # the initial weights depend on the seed alone
    model = build_model(cfg.model.arch, cfg.model.weights, spec.head).to(device)
    channels_last = t.channels_last and channels_last_pays(device, amp)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = _optimizer(cfg, model)
    state = TrainState(
        bundle=ModelBundle(model=model, pipeline=spec, arch=cfg.model.arch, preprocess=pre, meta=dict(meta or {})),
        optimizer=optimizer,
        scheduler=_scheduler(cfg, optimizer, epochs, len(train_loader)),
        scaler=torch.amp.GradScaler(device.type, enabled=amp and amp_dtype(device) == torch.float16),
        fingerprint=_fingerprint(cfg, pipeline, epochs, train_items, val_items),
    )
    ctx = TrainContext(
        loss=cfg.loss,
        device=device,
        amp=amp,
        channels_last=channels_last,
        class_weights=class_weights.to(device) if t.balance == "weighted_loss" else None,
        mixup=cfg.augment.mixup,
        seed=t.seed,
    )
    return state, ctx, train_loader, val_loader


# One epoch --------------------------------------------------------------------------------


def _to_input(x: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def mixup_pairs(n: int, alpha: float, rng: np.random.Generator) -> tuple[Tensor, float]:
    """Mixup's partners and weight for a batch of n: a permutation and lam ~ Beta(alpha, alpha),
    folded to lam >= 0.5 so that each mixed cell stays closest to its own label."""
    lam = float(rng.beta(alpha, alpha))
    return torch.from_numpy(rng.permutation(n)), max(lam, 1.0 - lam)


def _batch_loss(state: TrainState, ctx: TrainContext, x: Tensor, y: Tensor,
                mix_rng: np.random.Generator | None) -> Tensor:
    """The pipeline's loss of one batch (class-weighted when ctx has weights), mixed up when mix_rng is given."""
    loss_of = state.bundle.pipeline.loss
    weight = ctx.class_weights[y] if ctx.class_weights is not None else None
    if mix_rng is None:
        with autocast(ctx.device, ctx.amp):
            out = state.bundle.model(x)
        return loss_of(out.float(), y, ctx.loss, weight)
    partner, lam = mixup_pairs(len(y), ctx.mixup, mix_rng)
    partner = partner.to(ctx.device)
    with autocast(ctx.device, ctx.amp):
        out = state.bundle.model(lam * x + (1 - lam) * x[partner])
    partner_weight = weight[partner] if weight is not None else None
    return (lam * loss_of(out.float(), y, ctx.loss, weight)
            + (1 - lam) * loss_of(out.float(), y[partner], ctx.loss, partner_weight))


def train_one_epoch(state: TrainState, ctx: TrainContext, loader: DataLoader, epoch: int,
                    bar: tqdm | None = None) -> tuple[float, float]:
    """Train `state`'s model for epoch `epoch` (one pass over `loader`) and advance its schedule
    (per batch for one-cycle, else per epoch): (mean loss, learning rate of the last step).

    Mixup draws from np.random.default_rng([seed, epoch]): an epoch is the same resumed or not."""
    model, optimizer, scheduler = state.bundle.model, state.optimizer, state.scheduler
    per_batch = isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR)
    mix_rng = np.random.default_rng([ctx.seed, epoch]) if ctx.mixup > 0 else None
    model.train()
    clock = ComputeClock(ctx.device, "train")
    total, count, lr = 0.0, 0, optimizer.param_groups[0]["lr"]
    for x, y in loader:
        x = _to_input(x, ctx.device, ctx.channels_last)
        y = y.to(ctx.device, non_blocking=True)
        with clock("forward"):
            loss = _batch_loss(state, ctx, x, y, mix_rng)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"the training loss became {loss.item()}; "
                                   f"lower train.lr (now {optimizer.defaults['lr']:g})")
        optimizer.zero_grad(set_to_none=True)
        with clock("backward"):
            state.scaler.scale(loss).backward()
        lr = optimizer.param_groups[0]["lr"]
        with clock("step"):
            state.scaler.step(optimizer)
            state.scaler.update()
        if per_batch:
            scheduler.step()
        total += loss.item() * len(y)
        count += len(y)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(_postfix(bar, loss=loss.item()), refresh=False)
    if scheduler is not None and not per_batch:
        scheduler.step()
    clock.write()
    return total / max(count, 1), lr


@torch.no_grad()
def _predict(model: nn.Module, loader, device, channels_last: bool, amp: bool = False) -> Tensor:
    """The model's raw outputs over a loader of (image, label), on the CPU, float32."""
    model.eval()
    clock = ComputeClock(torch.device(device), "predict")
    outs = []
    for x, _ in loader:
        x = _to_input(x, device, channels_last)
        with clock("forward"), autocast(device, amp):
            outs.append(model(x).float().cpu())
    clock.write()
    return torch.cat(outs)


def evaluate(bundle: ModelBundle, ctx: TrainContext, loader: DataLoader) -> dict[str, float]:
    """The bundle's validation loss (un-weighted) and the scalar metrics of compute_metrics
    (un-prefixed) over a loader of a CellDataset."""
    outputs = _predict(bundle.model, loader, ctx.device, ctx.channels_last, ctx.amp)
    if not torch.isfinite(outputs).all():
        raise TrainingDiverged("the model's outputs became NaN or infinite; lower train.lr")
    y = loader.dataset.severities
    pred = bundle.pipeline.decode(outputs)
    metrics = compute_metrics(y.numpy(), pred.probs.numpy(), pred.label.numpy(), pred.score.numpy())
    scalars = {k: float(v) for k, v in metrics.items() if k in STOPPING_METRICS}
    scalars["loss"] = float(bundle.pipeline.loss(outputs, y, ctx.loss, None))
    return scalars


def _postfix(bar, **values) -> str:
    state = getattr(bar, "_pap_state", {})
    state.update(values)
    bar._pap_state = state
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in state.items())


# The loop ---------------------------------------------------------------------------------


def _fit(cfg: Config, pipeline: str, train_items: pd.DataFrame, val_items: pd.DataFrame | None,
         checkpoint: Path, *, epochs: int, resume: bool, progress: bool, fold: int, meta: dict,
         on_epoch: Callable[[int, dict], None] | None = None,
         log_epoch: Callable[[dict], None] | None = None) -> FoldResult:
    metric = cfg.train.early_stopping_metric if val_items is not None else None
    if metric is not None and metric not in STOPPING_METRICS:
        raise ValueError(f"train.early_stopping_metric {metric!r} is not a metric; "
                         f"choose from {', '.join(sorted(STOPPING_METRICS))}")
    checkpoint = Path(checkpoint)
    done = _finished(checkpoint, _fingerprint(cfg, pipeline, epochs, train_items, val_items)) if resume else None
    if done is not None:
        return FoldResult(fold, checkpoint, **done)

    with _torch_threads(cfg.train.threads):
        state, ctx, train_loader, val_loader = setup_training(cfg, pipeline, train_items, val_items,
                                                              epochs=epochs, meta=meta)
        state_file = resume_path(checkpoint)
        if resume and state_file.is_file():
            state.load(state_file)
        steps = len(train_loader)
        desc = f"{pipeline} fold {fold}" if val_items is not None else f"{pipeline} final"
        with progress_bar(total=epochs * steps, initial=state.epoch * steps, desc=desc, unit="batch",
                          progress=progress, leave=True, dynamic_ncols=True) as bar:
            while state.epoch < epochs and not state.stopped(cfg.train.patience):
                epoch = state.epoch + 1
                train_loader.sampler.set_epoch(epoch)
                _postfix(bar, epoch=f"{epoch}/{epochs}")
                train_loss, lr = train_one_epoch(state, ctx, train_loader, epoch, bar)
                metrics = evaluate(state.bundle, ctx, val_loader) if val_loader is not None else {}
                entry = {"epoch": epoch, "train_loss": train_loss, "lr": lr,
                         **{f"val_{k}": v for k, v in metrics.items()}}
                state.end_epoch(entry, metric)
                shown = {"loss": train_loss, **({f"val_{metric}": metrics[metric]} if metrics else {})}
                bar.set_postfix_str(_postfix(bar, **shown))
                if log_epoch is not None:
                    log_epoch(entry)
                state.save(state_file)
                if on_epoch is not None:
                    on_epoch(epoch, metrics)

    state.finish(checkpoint, {**meta, "fold": fold, "early_stopping_metric": metric})
    return FoldResult(fold, checkpoint, state.best_epoch, state.best_metric, state.history)


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
    log_epoch: Callable[[dict], None] | None = None,
) -> FoldResult:
    """Train one model on `train_items`, early-stopped on `val_items`; the best epoch's weights
    are saved at `checkpoint` (a bundle for `load_bundle`, with the history in its extra).

    items: DataFrames with columns path, severity (0..4). `on_epoch(epoch, metrics)` runs after
    each epoch with the validation metrics (keys of compute_metrics plus `loss`); an exception
    it raises (optuna.TrialPruned) propagates, the epoch's state already saved. `log_epoch(entry)`
    gets every epoch's history entry (epoch, train_loss, lr, val_*) before it is saved.
    `resume=True` continues from `<checkpoint>.resume`, or returns a finished training at
    `checkpoint` made with the same settings and cells without training again.
    """
    return _fit(cfg, pipeline, train_items, val_items, checkpoint, epochs=cfg.train.epochs, resume=resume,
                progress=progress, fold=fold, meta={"pipeline": pipeline, "role": "cv"},
                on_epoch=on_epoch, log_epoch=log_epoch)


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
    cv = split_items(manifest, splits)["cv"].drop_duplicates("path")  # every repeat holds every cv cell
    _fit(cfg, pipeline, cv, None, Path(checkpoint), epochs=epochs or cfg.train.epochs, resume=resume,
         progress=progress, fold=-1, meta={"pipeline": pipeline, "role": "final"})
    return load_bundle(checkpoint)[0]


# Prediction and cross-validation ------------------------------------------------------------


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
    """The cv, calib and test rows of splits (path, sha256 when present, severity, repeat, part,
    fold), checked against the manifest. cv holds a row per (cell, repeat); calib and test one row
    per cell (they are the same in every repeat); a part the splits lack is an empty frame."""
    missing = {"path", "severity", "part", "fold"} - set(splits.columns)
    if missing:
        raise ValueError(f"splits table lacks columns {sorted(missing)}")
    unknown = set(splits["path"].astype(str)) - set(manifest["path"].astype(str))
    if unknown:
        raise ValueError(
            f"{len(unknown)} cells of the splits are not in the manifest (e.g. {sorted(unknown)[0]}); "
            "rebuild the splits from this manifest (`pap-severity data split`)"
        )
    rows = splits.loc[:, [c for c in ("path", "sha256", "severity", "repeat", "part", "fold")
                          if c in splits.columns]].copy()
    if "repeat" not in rows.columns:
        rows.insert(rows.columns.get_loc("part"), "repeat", 0)
    rows[["severity", "repeat", "fold"]] = rows[["severity", "repeat", "fold"]].astype(int)
    parts = {"cv": rows[rows["part"] == "cv"].reset_index(drop=True)}
    for part in ("calib", "test"):
        parts[part] = held_out(rows, part)
    if parts["cv"].empty:
        raise ValueError("the splits hold no cv cells to train on")
    return parts


def split_label(repeat: int, fold: int) -> str:
    """How a (repeat, fold) split is named in files and runs: the fold alone in the first repeat
    (so a single split reads as before), `<fold>-r<repeat>` in the others."""
    return str(fold) if repeat == 0 else f"{fold}-r{repeat}"


def fold_checkpoint(out_dir: str | Path, pipeline: str, fold: int, repeat: int = 0) -> Path:
    return pipeline_dir(out_dir, pipeline) / f"fold{split_label(repeat, fold)}.pt"


class CVCallbacks:
    """What `cross_validate` reports while it runs, in this order: `pipeline_run` (open for the
    whole pipeline), then per fold `fold_run` (open for the fold) holding `on_epoch` per epoch,
    then `on_fold_end`; last `on_pipeline_end`. This one does nothing; an observer
    (tracking.CVRuns, for MLflow) has the same methods and need not subclass it."""

    def pipeline_run(self, pipeline: str, out: Path, resume: bool, manifest: pd.DataFrame):
        """A context open while the pipeline's folds run; `out` is the pipeline's folder, `manifest`
        the cells the splits were drawn from."""
        return nullcontext()

    def fold_run(self, fold: str):
        """A context open while split `fold` (its `split_label`) trains, is predicted and reported."""
        return nullcontext()

    def on_epoch(self, entry: dict) -> None:
        """An epoch's history entry (epoch, train_loss, lr, val_*) of the open fold."""

    def on_fold_end(self, fold: str, result: FoldResult, metrics: dict[str, float]) -> None:
        """The fold's training (a finished one reused on resume too; its model file is
        `result.checkpoint`) and the kept model's metrics: val_<metric> on its validation fold,
        calib_<metric> and test_<metric> on the calibration and test parts."""

    def on_pipeline_end(self, fold_metrics: list[dict[str, float]]) -> None:
        """The metrics of every fold, in fold order."""


def _predict_fold(bundle: ModelBundle, pipeline: str, repeat: int, fold: int,
                  parts: dict[str, pd.DataFrame]) -> tuple[list[pd.DataFrame], dict[str, float]]:
    """The prediction tables of a fold model on each non-empty part (val, calib, test) and its
    `<part>_<metric>` scalars."""
    tables, metrics = [], {}
    for part, items in parts.items():
        if items.empty:
            continue
        table = predict_items(bundle, items)
        table.insert(0, "part", part)
        table.insert(0, "fold", fold)
        table.insert(0, "repeat", repeat)
        table.insert(0, "pipeline", pipeline)
        tables.append(table)
        m = compute_metrics(table["severity"].to_numpy(), table[PROB_COLUMNS].to_numpy(),
                            table["pred"].to_numpy(), table["score"].to_numpy())
        metrics.update({f"{part}_{name}": float(v) for name, v in m.items() if name in STOPPING_METRICS})
    return tables, metrics


def cross_validate(
    cfg: Config,
    pipeline: str,
    manifest: pd.DataFrame,
    splits: pd.DataFrame,
    out_dir: Path,
    *,
    resume: bool = False,
    callbacks: CVCallbacks | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """One model per cv fold of every repeat (that fold validates and early-stops it), each
    predicted on its validation fold, the calibration part and the held-out test part.

    Writes under `out_dir/<pipeline>/`: `fold<label>.pt` (bundles; `split_label`),
    `predictions.csv` (columns pipeline, repeat, fold, part (val|calib|test), path, severity, pred,
    score, p0..p4: returned too) and `training.json` (per split label: repeat, fold, best epoch,
    metrics, history). `callbacks` (a CVCallbacks, e.g. tracking.CVRuns, which adds
    `mlflow_runs.json`) is told of every step, a split named by its label. `resume=True` reuses
    finished folds and continues an interrupted one.
    """
    get_pipeline(pipeline)
    parts = split_items(manifest, splits)
    cv, calib, test = parts["cv"], parts["calib"], parts["test"]
    pairs = list(cv_pairs(cv))
    if len({k for r, k, _, _ in pairs if r == 0}) < 2:
        raise ValueError(f"the splits hold {len(pairs)} cv fold(s); cross-validation needs at least 2")
    out = pipeline_dir(out_dir, pipeline)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.train.device)
    callbacks = callbacks if callbacks is not None else CVCallbacks()

    tables, summary, fold_metrics = [], {}, []
    with callbacks.pipeline_run(pipeline, out, resume, manifest):
        for r, k, train_items, val_items in pairs:
            label = split_label(r, k)
            with callbacks.fold_run(label):
                result = train_fold(cfg, pipeline, train_items, val_items, fold_checkpoint(out_dir, pipeline, k, r),
                                    resume=resume, progress=progress, fold=k, log_epoch=callbacks.on_epoch)
                bundle, _ = load_bundle(result.checkpoint, map_location=device)
                fold_tables, metrics = _predict_fold(bundle, pipeline, r, k,
                                                     {"val": val_items, "calib": calib, "test": test})
                tables += fold_tables
                fold_metrics.append(metrics)
                summary[label] = {"repeat": r, "fold": k, "best_epoch": result.best_epoch,
                                  "best_metric": result.best_metric, "metrics": metrics, "history": result.history}
                callbacks.on_fold_end(label, result, metrics)
        callbacks.on_pipeline_end(fold_metrics)

    predictions = pd.concat(tables, ignore_index=True).loc[:, list(PREDICTION_COLUMNS)]
    write_text(out / PREDICTIONS_FILE, predictions.to_csv(index=False))
    write_json(summary, out / TRAINING_FILE)
    return predictions


__all__ = [
    "CVCallbacks",
    "EpochSampler",
    "FoldResult",
    "TrainContext",
    "TrainState",
    "TrainingDiverged",
    "cross_validate",
    "evaluate",
    "fold_checkpoint",
    "is_better",
    "mixup_pairs",
    "pipeline_dir",
    "predict_items",
    "resolve_device",
    "resume_path",
    "seed_everything",
    "setup_training",
    "split_items",
    "train_final",
    "train_fold",
    "train_one_epoch",
]
