"""Do the maps depend on what the model learned? Cascading randomisation (Adebayo et al. 2018).

The model's layers are re-initialised from the top down (head, layer4, layer3, layer2,
layer1, stem), each step on top of the previous ones (PyTorch's default initialisation;
BatchNorm gets fresh running statistics and random affine parameters; the fixed
expected-score layer stays); after each step attributions are recomputed and compared
with the trained model's by the Spearman rank correlation of |Am|, averaged over a few
images. Low correlations mean the maps depend on what the model learned; high ones mean
they mostly reflect the input itself. The report states the values as they are.

A model holding several ResNet `SeverityNet`s (a fold ensemble) is randomised block by
block in all of them at once, so its stages are the same six; any other model cascades
over its children, last first.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr
from torch import Tensor, nn

from pap_severity.checkpoints import ModelBundle
from pap_severity.config import ExplainConfig
from pap_severity.explain.attribution import ConvergenceWarning, attribute, attribution_map
from pap_severity.models import ExpectedScore, SeverityNet
from pap_severity.progress import progress_bar

SANITY_COLUMNS = ("stage", "spearman_abs", "spearman_abs_std", "spearman_signed", "n_images")
RESNET_BLOCKS = ("layer4", "layer3", "layer2", "layer1")


def _resnets(model: nn.Module) -> list[SeverityNet]:
    """The ResNet SeverityNets in model (itself, or the members of an ensemble)."""
    return [
        m for m in model.modules()
        if isinstance(m, SeverityNet) and all(hasattr(m.backbone, a) for a in (*RESNET_BLOCKS, "conv1", "bn1"))
    ]


def cascade_stages(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """The model's blocks from the top (output) down, as the cascade randomises them."""
    nets = _resnets(model)
    if nets:
        return [
            ("head", [n.head for n in nets]),
            *((block, [getattr(n.backbone, block) for n in nets]) for block in RESNET_BLOCKS),
            ("stem", [m for n in nets for m in (n.backbone.conv1, n.backbone.bn1)]),
        ]
    children = [(name, [child]) for name, child in model.named_children()]
    return list(reversed(children))


def _reinitialise(module: nn.Module) -> None:
    """Re-initialise every layer inside module the way PyTorch initialises it; BatchNorm layers get
    fresh running statistics and random affine parameters (N(1, 0.5) and N(0, 0.5)) instead of the
    identity. The fixed expected-score layer is part of the architecture and stays."""
    fixed = {id(s) for m in module.modules() if isinstance(m, ExpectedScore) for s in m.modules()}
    for m in module.modules():
        if id(m) in fixed or not hasattr(m, "reset_parameters"):
            continue
        m.reset_parameters()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            with torch.no_grad():
                m.weight.normal_(1.0, 0.5)
                m.bias.normal_(0.0, 0.5)


def randomise_cascade(model: nn.Module, seed: int = 0) -> Iterator[tuple[str, nn.Module]]:
    """Yield (stage, model) with the stages re-initialised cumulatively from the top down.

    Works on a deep copy (the given model is untouched). The SAME copy is yielded each time,
    one more stage randomised: use it before advancing the iterator.
    """
    randomised = copy.deepcopy(model)
    randomised.eval()
    device = next(randomised.parameters()).device
    devices = [device.index or 0] if device.type == "cuda" else []
    for k, (name, modules) in enumerate(cascade_stages(randomised)):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed * 1000 + k)
            for module in modules:
                _reinitialise(module)
        yield name, randomised


def _nan_stat(values: list[float], stat) -> float:
    return float(stat(values)) if not np.isnan(values).all() else math.nan


def sanity_check(
    bundle: ModelBundle,
    images: Tensor,
    cfg: ExplainConfig,
    trained_maps: np.ndarray | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Spearman rank correlation of |Am| between the trained and each cascade-randomised model.

    Returns one row per stage: stage, spearman_abs (mean over images), spearman_abs_std,
    spearman_signed (mean), n_images.
    """
    if trained_maps is None:
        trained_maps = attribution_map(attribute(bundle, images, cfg)[0])
    rows = []
    stages = randomise_cascade(bundle.model, seed=cfg.seed)
    for stage, model in progress_bar(stages, progress=progress, desc="sanity check", unit="stage",
                                     total=len(cascade_stages(bundle.model))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            maps = attribution_map(attribute(replace(bundle, model=model), images, cfg)[0])
        rho_abs, rho_signed = [], []
        for trained, rand in zip(trained_maps, maps):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a constant map gives NaN, said as NaN
                rho_abs.append(spearmanr(np.abs(trained).ravel(), np.abs(rand).ravel()).statistic)
                rho_signed.append(spearmanr(trained.ravel(), rand.ravel()).statistic)
        rows.append(
            {
                "stage": stage,
                "spearman_abs": _nan_stat(rho_abs, np.nanmean),
                "spearman_abs_std": _nan_stat(rho_abs, np.nanstd),
                "spearman_signed": _nan_stat(rho_signed, np.nanmean),
                "n_images": len(maps),
            }
        )
    return pd.DataFrame(rows, columns=list(SANITY_COLUMNS))
