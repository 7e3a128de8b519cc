"""The one typed configuration, loaded from `params.yaml`.

Every section is a frozen pydantic model that forbids unknown keys, so a typo in
params.yaml fails at load time with the key's name instead of being ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

PIPELINES = ("classification", "regression", "combined", "corn", "sord")
LAMBDA_PIPELINES = ("combined",)  # the pipelines whose loss has the weight loss.lambda (tuning searches it)


def check_pipeline(name: str) -> str:
    """`name` if it names a pipeline, else the ValueError that lists them (no torch needed)."""
    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; choose from {', '.join(PIPELINES)}")
    return name


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
    # Held out from training like the test part, for the served model's temperature and
    # referral threshold; 0 leaves the served model uncalibrated (the ensemble stage refuses).
    calibration_fraction: float = Field(0.1, ge=0.0, lt=0.5)
    seed: int = 0
    # Repeated k-fold: each repeat deals the cv cells into `folds` folds with its own seed; the
    # held-out test part is the same for every repeat. 1 is plain k-fold.
    repeats: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _parts(self) -> SplitConfig:
        if self.test_fraction + self.calibration_fraction >= 0.8:
            raise ValueError("split.test_fraction + split.calibration_fraction leave under 20% of the cells "
                             "to train on; lower them")
        return self


ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
NARROW_WIDTHS = range(4, 65)


def parse_arch(arch: str) -> tuple[str, int]:
    """`resnet18` -> (resnet18, 64); `resnet18_w16` -> (resnet18, 16): torchvision's ResNet with a
    first stage `width` channels wide instead of 64, every later stage narrowed alike (resnet18_w16
    has 1/16 of the weights). Pure, so that loading params.yaml needs no torch."""
    base, sep, width = arch.partition("_w")
    if base not in ARCHS or (sep and not (width.isdigit() and int(width) in NARROW_WIDTHS)):
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}, or one of them "
                         f"narrowed as <name>_w<width> with width {NARROW_WIDTHS.start} to "
                         f"{NARROW_WIDTHS.stop - 1} (torchvision's is 64), e.g. resnet18_w16")
    return base, int(width) if sep else 64


class ModelConfig(Section):
    # A torchvision ResNet, or a narrowed one (`resnet18_w16`, from scratch only): see parse_arch.
    arch: str = "resnet18_w16"
    weights: Literal["imagenet", "none"] = "none"
    image_size: int = Field(64, ge=16)

    @field_validator("arch")
    @classmethod
    def _arch(cls, arch: str) -> str:
        parse_arch(arch)
        return arch

    @model_validator(mode="after")
    def _weights(self) -> ModelConfig:
        base, width = parse_arch(self.arch)
        if self.weights == "imagenet" and width != 64:
            raise ValueError(f"model.weights=imagenet needs torchvision's width: ImageNet weights exist for "
                             f"{base}, not for {self.arch}; use model.weights=none, or model.arch={base}")
        return self


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


class EnsembleConfig(Section):
    """What is served and registered: the fold ensemble (default) or the single final model."""

    # folds: the k fold models of the cross-validation (its first repeat), averaged;
    # final: the one model trained on every cv cell.
    members: Literal["folds", "final"] = "folds"
    # dihedral8: each cell in its 8 poses (4 rotations by 90 degrees, each mirrored or not).
    tta: Literal["dihedral8", "none"] = "dihedral8"


class ReferralConfig(Section):
    """When the served model says a cytologist should look: its uncertainty is above a threshold
    chosen, on the calibration part, so that at most `max_rate` of those cells are referred."""

    max_rate: float = Field(0.2, ge=0.0, le=1.0)
    measure: Literal["entropy", "score_std", "mutual_info", "disagreement"] = "entropy"


class CompareConfig(Section):
    # The pipeline every other one is compared with, pair by pair over the (repeat, fold) splits.
    reference: str = "classification"

    @model_validator(mode="after")
    def _known(self) -> CompareConfig:
        if self.reference not in PIPELINES:
            raise ValueError(f"compare.reference {self.reference!r} is not a pipeline; choose from {list(PIPELINES)}")
        return self


class TuneRange(Section):
    """One setting a study searches: numbers from `low` to `high` (log-uniform with `log`, on a
    grid with `step`), or one of `choices`. Checked against the setting by TuneConfig."""

    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: int | float | None = None
    choices: tuple[bool | int | float | str, ...] | None = None


def _default_space() -> dict[str, TuneRange]:
    return {
        "train.lr": TuneRange(low=1e-4, high=3e-3, log=True),
        "train.weight_decay": TuneRange(low=1e-6, high=1e-2, log=True),
        # Only for the pipelines whose loss has the weight (LAMBDA_PIPELINES).
        "loss.lambda": TuneRange(low=0.1, high=4.0),
    }


class TuneConfig(Section):
    n_trials: int = Field(4, ge=1)
    timeout: float | None = Field(None, gt=0)
    epochs: int = Field(3, ge=1)
    metric: str = "accuracy"
    # What the study searches, by dotted setting name (any key of RUN_PARAMS; loss.lambda only
    # for the pipelines whose loss has it). The default is not validated (that needs Config and
    # RUN_PARAMS, defined below); a test validates it.
    space: dict[str, TuneRange] = Field(default_factory=_default_space)
    seed: int = 0
    # Empty: a journal file under the stage's outs. Else an Optuna storage URL
    # (postgresql://...) that many workers share.
    storage: str = ""
    # Median pruner: trials that must finish before it judges one, and the number of first
    # global epoch steps (fold index * trial epochs + epoch - 1, from 0) it never judges.
    pruner_startup_trials: int = Field(2, ge=0)
    pruner_warmup_steps: int = Field(1, ge=0)
    # RDB (PostgreSQL) storage: seconds between a running trial's heartbeats, and the silence
    # after which another worker fails that trial and queues its parameters again.
    heartbeat_interval: int = Field(30, ge=1)
    grace_period: int = Field(120, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data):
        if isinstance(data, dict):
            for old, key in (("lr", "train.lr"), ("weight_decay", "train.weight_decay"), ("lambda", "loss.lambda")):
                if old in data:
                    raise ValueError(f"tune.{old} is now tune.space: {key}: {{low: ..., high: ...}} "
                                     f"(see README, tuning)")
        return data

    @field_validator("space")
    @classmethod
    def _space(cls, space: dict[str, TuneRange]) -> dict[str, TuneRange]:
        if not space:
            raise ValueError("tune.space is empty; name at least one setting to tune, "
                             "e.g. train.lr: {low: 1.0e-4, high: 3.0e-3, log: true}")
        return {key: _checked_range(key, entry) for key, entry in space.items()}


def _checked_range(key: str, entry: TuneRange) -> TuneRange:
    """`entry` with its bounds or choices in the type of setting `key`; ValueError naming the key."""
    where = f"tune.space.{key}"
    section, _, name = key.partition(".")
    model = Config.model_fields[section].annotation if section in Config.model_fields else None
    fields = {(f.alias or n): f for n, f in model.model_fields.items()} if isinstance(model, type) and \
        issubclass(model, Section) else {}
    if not name or name not in fields:
        raise ValueError(f"{where}: no such setting; name one by section and key, e.g. train.lr or augment.hed")
    if key not in RUN_PARAMS and section not in RUN_PARAMS:
        raise ValueError(f"{where}: not a setting that defines a training run ({', '.join(RUN_PARAMS)}); "
                         "tune one of those")
    if key == "train.early_stopping_metric":
        raise ValueError(f"{where}: every trial stops on tune.metric, the objective's metric; "
                         "remove it from tune.space")
    field = fields[name]
    adapter = TypeAdapter(Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation)

    def valid(value, what: str):
        if field.annotation is float and type(value) is int:
            value = float(value)
        try:
            return adapter.validate_python(value, strict=True)
        except ValidationError as exc:
            raise ValueError(f"{where}: {what} {value!r} is not a valid {key}: {exc.errors()[0]['msg']}") from None

    if entry.choices is not None:
        if entry.low is not None or entry.high is not None or entry.step is not None or entry.log:
            raise ValueError(f"{where}: give either choices or low/high (log, step), not both")
        choices = tuple(valid(c, "choice") for c in entry.choices)
        if len(set(choices)) < 2 or len(set(choices)) != len(choices):
            raise ValueError(f"{where}: choices must hold at least two different values, "
                             f"got {list(entry.choices)}")
        return entry.model_copy(update={"choices": choices})
    if field.annotation not in (int, float):
        raise ValueError(f"{where}: {key} is not a number; give choices: [...]")
    if entry.low is None or entry.high is None:
        raise ValueError(f"{where}: needs low and high (or choices)")
    low, high = valid(entry.low, "low"), valid(entry.high, "high")
    step = entry.step
    if step is not None:
        if field.annotation is int and type(step) is not int:
            raise ValueError(f"{where}: step {step!r} must be an integer, as {key} is")
        step = step if field.annotation is int else float(step)
    if not low < high:
        raise ValueError(f"{where}: low ({low}) must be below high ({high})")
    if entry.log and low <= 0:
        raise ValueError(f"{where}: a log range needs low > 0, got {low}")
    if step is not None and (step <= 0 or entry.log):
        raise ValueError(f"{where}: step must be > 0 and cannot go with log, got step {step}")
    return entry.model_copy(update={"low": low, "high": high, "step": step})


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
    ensemble: EnsembleConfig = EnsembleConfig()
    referral: ReferralConfig = ReferralConfig()
    compare: CompareConfig = CompareConfig()
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
