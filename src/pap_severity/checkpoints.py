"""A trained model travels as a bundle: weights, pipeline name, architecture and preprocessing.

Explain, evaluation, the registry and the server all load the same bundle, so the
input a model sees never depends on who calls it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pap_severity.models import build_model
from pap_severity.pipelines import Pipeline, Prediction, get_pipeline
from pap_severity.transforms import Preprocess


@dataclass
class ModelBundle:
    model: nn.Module
    pipeline: Pipeline
    arch: str
    preprocess: Preprocess
    meta: dict[str, Any] = field(default_factory=dict)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        """Decode the model's output for a batch of preprocessed inputs."""
        self.model.eval()
        device = next(self.model.parameters()).device
        return self.pipeline.decode(self.model(x.to(device)).cpu())


def save_bundle(bundle: ModelBundle, path: str | Path, **extra: Any) -> Path:
    """Write the bundle (CPU tensors) atomically; `extra` holds training state for resume."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "state_dict": {k: v.detach().cpu() for k, v in bundle.model.state_dict().items()},
        "pipeline": bundle.pipeline.name,
        "arch": bundle.arch,
        "preprocess": bundle.preprocess.to_json(),
        "meta": bundle.meta,
        **extra,
    }
    partial = path.with_name(path.name + ".part")
    torch.save(state, partial)
    partial.replace(path)
    return path


def load_bundle(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[ModelBundle, dict[str, Any]]:
    """Load a bundle on map_location (CPU by default, whatever device trained it) and the rest of the file."""
    path = Path(path)
    if not path.is_file():
        # DVC stores each model once (its cache): a deleted file comes back from there, not by retraining.
        raise FileNotFoundError(f"{path}: no model file; `dvc checkout {path}` restores it from the DVC cache "
                                "(`dvc pull` from a remote; `dvc repro` trains it again if neither holds it)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # a torn or foreign file: say so instead of a pickle traceback
        raise ValueError(f"{path}: not a pap-severity model file ({type(exc).__name__}: {exc})") from None
    pipeline = get_pipeline(state["pipeline"])
    model = build_model(state["arch"], "none", pipeline.head)
    model.load_state_dict(state["state_dict"])
    model.to(map_location).eval()
    bundle = ModelBundle(
        model=model,
        pipeline=pipeline,
        arch=state["arch"],
        preprocess=Preprocess.from_json(state["preprocess"]),
        meta=state.get("meta", {}),
    )
    rest = {k: v for k, v in state.items() if k not in ("state_dict", "pipeline", "arch", "preprocess", "meta")}
    return bundle, rest
