"""The one typed configuration, loaded from `params.yaml`.

Every section is a frozen pydantic model that forbids unknown keys, so a typo in
params.yaml fails at load time with the key's name instead of being ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PIPELINES = ("classification", "regression", "combined", "corn", "sord")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class DataConfig(Section):
    """Where the cells come from and what the validation suite demands of them."""

    # The folder the pipeline reads cells from (smear2005 layout at any depth). The
    # default is the synth stage's output; `data fetch` prints the value for real Herlev.
    # Whether the cells are synthetic is read from the data (synth writes a marker).
    root: str = "data/synth"
    url: str = "https://mde-lab.aegean.gr/images/stories/docs/smear2005.zip"
    # Expected sha256 of the downloaded zip; empty skips the check (and prints the digest).
    sha256: str = ""
    download_dir: str = "data/raw"
    require_masks: bool = True
    min_size: int = Field(16, ge=1)
    max_size: int = Field(2048, ge=1)

    @model_validator(mode="after")
    def _sizes(self) -> DataConfig:
        if self.min_size > self.max_size:
            raise ValueError(f"data.min_size ({self.min_size}) exceeds data.max_size ({self.max_size})")
        return self


class SynthConfig(Section):
    per_class: int = Field(24, ge=1)
    size: int = Field(64, ge=24)
    seed: int = 0


class SplitConfig(Section):
    folds: int = Field(4, ge=2)
    test_fraction: float = Field(0.2, gt=0.0, lt=0.5)
    seed: int = 0


class ModelConfig(Section):
    arch: Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"] = "resnet18"
    weights: Literal["imagenet", "none"] = "none"
    image_size: int = Field(64, ge=16)


class AugmentConfig(Section):
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    affine_degrees: float = Field(10.0, ge=0.0)
    affine_translate: float = Field(0.05, ge=0.0, lt=0.5)
    affine_scale: float = Field(0.05, ge=0.0, lt=0.5)
    color_jitter: float = Field(0.1, ge=0.0, le=1.0)
    # Stain jitter in the haematoxylin-eosin-DAB space (Tellez et al. 2018): each stain's
    # concentration is scaled by U(1-h, 1+h) and shifted by U(-h, h); 0 turns it off.
    hed: float = Field(0.0, ge=0.0, le=1.0)
    # Mixup (Zhang et al. 2018): Beta(a, a) blends of two training cells and of their losses; 0 is off.
    mixup: float = Field(0.0, ge=0.0)


class LossConfig(Section):
    # Weight of the squared score error in the combined (and mean-variance) loss; paper: 1.
    lambda_: float = Field(1.0, ge=0.0, alias="lambda")
    # Distance scale of the SORD soft labels: p_k ~ exp(-sord_scale * |k - y|^2).
    sord_scale: float = Field(1.0, gt=0.0)
    # Label smoothing of the cross-entropy terms (classification, combined); 0 is off.
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


class TrainConfig(Section):
    pipelines: tuple[str, ...] = PIPELINES
    epochs: int = Field(6, ge=1)
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    scheduler: Literal["cosine", "onecycle", "none"] = "cosine"
    early_stopping_metric: str = "accuracy"
    patience: int = Field(5, ge=1)
    balance: Literal["weighted_loss", "sampler", "none"] = "weighted_loss"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    amp: bool = True
    channels_last: bool = True
    workers: int = Field(0, ge=0)
    seed: int = 0
    deterministic: bool = True
    # torch's intra-op CPU threads while training; 0 leaves torch's default (one per core).
    # 1 is much faster on a CPU shared with other busy processes (no spinning thread barriers).
    threads: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _pipelines(self) -> TrainConfig:
        unknown = [p for p in self.pipelines if p not in PIPELINES]
        if unknown:
            raise ValueError(f"unknown pipeline(s) {unknown}; choose from {list(PIPELINES)}")
        return self


class ExplainConfig(Section):
    pipelines: tuple[str, ...] = ("combined",)
    target: Literal["score", "predicted"] = "score"
    baseline: Literal["white", "black", "blur", "noise"] = "white"
    n_steps: int = Field(50, ge=2)
    method: Literal["gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle"] = (
        "gausslegendre"
    )
    internal_batch_size: int = Field(51, ge=1)
    delta_threshold: float = Field(0.05, ge=0.0)
    cells_per_class: int = Field(3, ge=1)
    sanity_check: bool = True
    seed: int = 0


class TuneConfig(Section):
    n_trials: int = Field(4, ge=1)
    timeout: float | None = Field(None, gt=0)
    epochs: int = Field(3, ge=1)
    metric: str = "accuracy"
    lr: tuple[float, float] = (1e-4, 3e-3)
    weight_decay: tuple[float, float] = (1e-6, 1e-2)
    lambda_: tuple[float, float] = Field((0.1, 4.0), alias="lambda")
    seed: int = 0
    # Empty: a journal file under the stage's outs. Else an Optuna storage URL
    # (postgresql://...) that many workers share.
    storage: str = ""
    # Median pruner: trials that must finish before it judges one, and the number of first
    # global epoch steps (fold index * tune.epochs + epoch - 1, from 0) it never judges.
    pruner_startup_trials: int = Field(2, ge=0)
    pruner_warmup_steps: int = Field(1, ge=0)
    # RDB (PostgreSQL) storage: seconds between a running trial's heartbeats, and the silence
    # after which another worker fails that trial and queues its parameters again.
    heartbeat_interval: int = Field(30, ge=1)
    grace_period: int = Field(120, ge=1)

    @model_validator(mode="after")
    def _ranges(self) -> TuneConfig:
        for name in ("lr", "weight_decay", "lambda_"):
            lo, hi = getattr(self, name)
            if not 0 < lo < hi:
                raise ValueError(f"tune.{name.rstrip('_')} must be a range 0 < low < high, got [{lo}, {hi}]")
        return self


class RegistryConfig(Section):
    model_name: str = "pap-severity"
    pipeline: str = "combined"
    # A new version takes `alias` only if on none of these test metrics it is worse than the
    # champion by more than its margin: one number for all, or {metric: margin}.
    metrics: tuple[str, ...] = ("accuracy", "mean_auc", "mse")
    margin: float | dict[str, float] = 0.0
    alias: str = "champion"
    # Registrations take a lock of the store (SQLite: a file lock; PostgreSQL: an advisory
    # lock). For an MLflow server (http), a postgresql:// URL to take the advisory lock in;
    # empty: no lock there (duplicates and lost alias moves are still checked afterwards).
    lock: str = ""

    @model_validator(mode="after")
    def _rule(self) -> RegistryConfig:
        if not self.metrics:
            raise ValueError("registry.metrics: name at least one metric")
        margins = self.margin if isinstance(self.margin, dict) else {"*": self.margin}
        negative = {k: v for k, v in margins.items() if not v >= 0}
        if negative:
            raise ValueError(f"registry.margin must be >= 0, got {negative}")
        if isinstance(self.margin, dict):
            stray = sorted(set(self.margin) - set(self.metrics))
            if stray:
                raise ValueError(f"registry.margin names {stray}, which are not in registry.metrics {list(self.metrics)}")
        return self


class ServeConfig(Section):
    host: str = "127.0.0.1"
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1)
    max_pixels: int = Field(4096 * 4096, ge=1)
    # Cells must also fit data.min_size..data.max_size a side (the sizes the data is validated
    # against); the longer side may be at most this many times the shorter one.
    max_aspect: float = Field(4.0, ge=1.0)
    # An uploaded mask is refused when more than this share of its pixels are none of the
    # Herlev mask colours (the mask decoder cannot place them: a lossy or foreign mask).
    max_mask_off_palette: float = Field(0.05, ge=0.0, le=1.0)
    # /readyz answers 503 when the model service has not said it is ready within this time.
    probe_timeout_ms: int = Field(1000, ge=1)
    batch_max_size: int = Field(32, ge=1)
    batch_max_latency_ms: int = Field(5000, ge=1)
    torch_threads: int = Field(1, ge=1)
    # Adaptive batching of /predict (needs batch_max_size >= 2); env PAP_SEVERITY_BATCHING=0|1 overrides.
    batching: bool = True
    # Where the served model runs: auto = CUDA when present, else CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"


class MlflowConfig(Section):
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "pap-severity"


class Config(Section):
    data: DataConfig = DataConfig()
    synth: SynthConfig = SynthConfig()
    split: SplitConfig = SplitConfig()
    model: ModelConfig = ModelConfig()
    augment: AugmentConfig = AugmentConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    explain: ExplainConfig = ExplainConfig()
    tune: TuneConfig = TuneConfig()
    registry: RegistryConfig = RegistryConfig()
    serve: ServeConfig = ServeConfig()
    mlflow: MlflowConfig = MlflowConfig()


# What defines a trained model: two trainings that agree on these settings (and on their cells)
# give the same weights. The training checkpoint's fingerprint and the Optuna study's name hash
# them, and a test checks that every training stage of dvc.yaml lists them as params. A section
# name stands for all of its keys. Not in it: train.pipelines (which models, not how),
# train.device, train.workers and train.threads (where and how fast, not what).
RUN_PARAMS: tuple[str, ...] = (
    "model",
    "augment",
    "loss",
    *(f"train.{key}" for key in TrainConfig.model_fields if key not in ("pipelines", "device", "workers", "threads")),
)


def run_definition(cfg: Config) -> dict:
    """The values of RUN_PARAMS in `cfg`, as a JSON-ready dict keyed by dotted name."""
    dumped = cfg.model_dump(mode="json", by_alias=True)
    out = {}
    for key in RUN_PARAMS:
        section, _, name = key.partition(".")
        out[key] = dumped[section][name] if name else dumped[section]
    return out


class ConfigError(ValueError):
    """params.yaml is missing, unreadable or holds a wrong value."""


def load_config(path: str | Path = "params.yaml") -> Config:
    """Load and check params.yaml; a missing file gives the defaults only if asked for explicitly."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file; run from the project root or pass --params FILE")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from None
