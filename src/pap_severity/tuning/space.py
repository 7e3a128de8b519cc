"""What a study searches, and the file its result lives in. No Optuna here.

The search space is `tune.space` in params.yaml, keyed by dotted setting names (any key of
`config.RUN_PARAMS`), each a range (`low`, `high`; `log`, `step`) or `choices`; `loss.lambda`
is searched only for the pipelines whose loss has that weight (`config.LAMBDA_PIPELINES`).
A trial trains with the sampled values, for `tune.epochs` epochs unless `train.epochs` is
searched, and stops early on `tune.metric` (`trial_config`): the keys in `overridden_keys`.

The study is named `<pipeline>-<hash>`, the hash covering what defines the search
(`study_settings`): the space, the metric, the trial epochs, the seed, the pruner, the cv
cells' content and folds, and `config.run_definition` less the keys the study overrides.
Changing any of them starts a new study instead of silently continuing a stale one;
n_trials, timeout and storage are not in it (raise n_trials to extend a finished study).

`tuning/<pipeline>/best_params.json` (`BEST_FILE`): the best trial's values by dotted key
(`params`), its value, the metric and direction, the trial counts, the study name and the
data source. The training stages read it with `read_best_params` and apply it with
`apply_best_params`; older files with `lr`, `weight_decay` and `lambda` still read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd

from pap_severity.config import LAMBDA_PIPELINES, Config, TuneRange, check_pipeline, run_definition
from pap_severity.files import write_json

BEST_FILE = "best_params.json"
OBJECTIVE = "mean over the cv folds of the validation {metric} at each fold's best epoch"
# Settings every trial sets itself: its length and the metric its best epoch is chosen by.
TRIAL_SETS = ("train.epochs", "train.early_stopping_metric")
# The names of best_params.json files written before the space was configurable.
OLD_NAMES = {"lr": "train.lr", "weight_decay": "train.weight_decay", "lambda": "loss.lambda"}


def search_space(cfg: Config, pipeline: str) -> dict[str, TuneRange]:
    """The entries of tune.space a pipeline's study searches (loss.lambda only where the loss has it)."""
    uses_lambda = check_pipeline(pipeline) in LAMBDA_PIPELINES
    space = {key: entry for key, entry in cfg.tune.space.items() if key != "loss.lambda" or uses_lambda}
    if not space:
        raise ValueError(f"tune.space holds nothing the {pipeline} pipeline uses ({', '.join(cfg.tune.space)}); "
                         "add a setting such as train.lr")
    return space


def overridden_keys(cfg: Config, pipeline: str) -> frozenset[str]:
    """The dotted keys of config.RUN_PARAMS a pipeline's trials set themselves, so they do not
    define its study: the searched settings, the trial length and the early-stopping metric."""
    return frozenset(search_space(cfg, pipeline)) | frozenset(TRIAL_SETS)


def trial_epochs(cfg: Config) -> int:
    """The most epochs a trial trains per fold: tune.epochs, or the top of a searched train.epochs."""
    entry = cfg.tune.space.get("train.epochs")
    if entry is None:
        return cfg.tune.epochs
    return int(max(entry.choices) if entry.choices is not None else entry.high)


def setting(cfg: Config, key: str) -> Any:
    """The value of a dotted setting (`loss.lambda`) in cfg, as params.yaml spells it."""
    section, _, name = key.partition(".")
    values = getattr(cfg, section).model_dump(mode="json", by_alias=True)
    if name not in values:
        raise KeyError(f"{key}: no such setting")
    return values[name]


def apply_best_params(cfg: Config, best: dict) -> Config:
    """cfg with the tuned values of `best` (the content of best_params.json, or its `params` alone),
    each checked like params.yaml; keys are dotted names, or the old lr, weight_decay, lambda."""
    params = best.get("params", best)
    sections: dict[str, dict] = {}
    for key, value in params.items():
        key = OLD_NAMES.get(key, key)
        section, _, name = key.partition(".")
        if not name or section not in Config.model_fields:
            raise ValueError(f"tuned parameter {key!r} is not a setting; expected dotted names such as train.lr")
        sections.setdefault(section, {})[name] = value
    update = {}
    for section, values in sections.items():
        current = getattr(cfg, section)
        known = current.model_dump(by_alias=True)
        unknown = set(values) - set(known)
        if unknown:
            raise ValueError(f"tuned parameter(s) {sorted(f'{section}.{k}' for k in unknown)} are not settings")
        update[section] = type(current).model_validate({**known, **values})
    return cfg.model_copy(update=update)


def trial_config(cfg: Config, params: dict) -> Config:
    """The settings one trial trains with: the sampled values, tune.epochs (unless train.epochs
    is searched), and early stopping on tune.metric (each fold's best epoch by the tuned metric)."""
    fixed = {"train.epochs": cfg.tune.epochs, "train.early_stopping_metric": cfg.tune.metric}
    return apply_best_params(cfg, {**fixed, **params})


def format_params(params: dict) -> str:
    """`train.lr=0.00123, model.arch=resnet34` for logs and the command line."""
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def cv_items(manifest: pd.DataFrame, splits: pd.DataFrame) -> pd.DataFrame:
    """The cv rows of the splits' first repeat (path, sha256, severity, part, fold): all tuning ever
    reads (a trial costs one cross-validation, not one per repeat). Asserts that no test or
    calibration cell is among them."""
    from pap_severity.training import split_items

    parts = split_items(manifest, splits)
    cv = parts["cv"][parts["cv"]["repeat"] == 0].reset_index(drop=True)
    held_out = set(parts["test"]["path"]) | set(parts["calib"]["path"])
    assert set(cv["path"]).isdisjoint(held_out), "a test or calibration cell is in the cv part"
    folds = sorted(cv["fold"].unique())
    if len(folds) < 2 or folds[0] < 0:
        raise ValueError(f"tuning needs at least 2 cv folds numbered from 0, the splits hold {folds}")
    return cv


def study_settings(cfg: Config, pipeline: str, cv: pd.DataFrame) -> dict:
    """What defines a study's search (its name hashes this); not n_trials, timeout, storage."""
    t = cfg.tune
    overridden = overridden_keys(cfg, pipeline)
    run = {}
    for key, value in run_definition(cfg).items():  # a section by its keys, so that one can be left out
        leaves = {f"{key}.{k}": v for k, v in value.items()} if "." not in key else {key: value}
        run |= {k: v for k, v in leaves.items() if k not in overridden}
    space = search_space(cfg, pipeline)
    key = "sha256" if "sha256" in cv.columns else "path"
    cells = sorted(f"{c}|{s}|{f}" for c, s, f in zip(cv[key].astype(str), cv["severity"], cv["fold"]))
    return {
        "pipeline": pipeline,
        "metric": t.metric,
        "epochs": None if "train.epochs" in t.space else t.epochs,
        "space": {k: entry.model_dump(mode="json", exclude_none=True) for k, entry in space.items()},
        "seed": t.seed,
        "pruner": [t.pruner_startup_trials, t.pruner_warmup_steps],
        "run": run,
        "cells": hashlib.sha256("\n".join(cells).encode()).hexdigest(),
    }


def default_study_name(cfg: Config, pipeline: str, cv: pd.DataFrame) -> str:
    text = json.dumps(study_settings(cfg, pipeline, cv), sort_keys=True, separators=(",", ":"))
    return f"{pipeline}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def write_best_params(path: str | Path, best: dict) -> Path:
    return write_json(best, path, sort_keys=True)


def read_best_params(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tuned parameters; run `pap-severity tune --pipeline ...` first")
    try:
        best = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc}); run `pap-severity tune` again") from None
    if not isinstance(best, dict) or not isinstance(best.get("params"), dict) or not best["params"]:
        raise ValueError(f"{path}: not a best_params.json written by pap-severity tune")
    return best
