"""torchvision ResNet backbones with one severity head each; every model returns ONE tensor.

The tensor is `[logits..., score]`: the head's trainable outputs, then the score 1..5
in the last column (for the regressor the score is the only column). One tensor is
what MLflow's pt2 format, Captum and the server all want.
"""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor, nn

from pap_severity.config import ARCHS, parse_arch
from pap_severity.losses import NUM_CLASSES, expected_score

__all__ = ["ARCHS", "build_backbone", "build_model"]


class WeightsUnavailable(RuntimeError):
    """ImageNet weights could not be loaded; the message names both ways forward."""


class ExpectedScore(nn.Module):
    """Fixed layer with weights (1..5) on the softmax: the paper's expected severity score."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.levels = nn.Linear(num_classes, 1, bias=False)
        with torch.no_grad():
            self.levels.weight.copy_(torch.arange(1, num_classes + 1, dtype=torch.float32)[None, :])
        self.levels.weight.requires_grad_(False)

    def forward(self, logits: Tensor) -> Tensor:
        return self.levels(torch.softmax(logits, dim=-1))


class ClassifierHead(nn.Module):
    """5 logits plus their expected score: `[logits(5), score]`."""

    def __init__(self, in_features: int, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)
        self.score = ExpectedScore(num_classes)

    def forward(self, features: Tensor) -> Tensor:
        logits = self.fc(features)
        return torch.cat([logits, self.score(logits)], dim=1)


class RegressionHead(nn.Module):
    """One output, the score; the bias starts at the middle of 1..5."""

    def __init__(self, in_features: int, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, 1)
        nn.init.constant_(self.fc.bias, (num_classes + 1) / 2)

    def forward(self, features: Tensor) -> Tensor:
        return self.fc(features)


def corn_probabilities(logits: Tensor) -> Tensor:
    """Class probabilities from CORN's conditional logits: P(y > k) is the running product."""
    above = torch.cumprod(torch.sigmoid(logits), dim=-1)
    ones = torch.ones_like(above[:, :1])
    zeros = torch.zeros_like(above[:, :1])
    return torch.cat([ones, above], dim=1) - torch.cat([above, zeros], dim=1)


class CornHead(nn.Module):
    """K-1 conditional logits plus the expected score: `[logits(4), score]`."""

    def __init__(self, in_features: int, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes - 1)

    def forward(self, features: Tensor) -> Tensor:
        logits = self.fc(features)
        return torch.cat([logits, expected_score(corn_probabilities(logits))[:, None]], dim=1)


class SeverityNet(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def _imagenet_weights(arch: str):
    return torchvision.models.get_model_weights(arch).IMAGENET1K_V1


class NarrowResNet(torchvision.models.ResNet):
    """torchvision's ResNet (its blocks, layer names and forward) `width` channels wide where
    torchvision fixes 64, later stages 2x, 4x, 8x that: a from-scratch model sized for CPUs."""

    def __init__(self, arch: str, width: int) -> None:
        nn.Module.__init__(self)
        with torch.device("meta"):  # the block type and depths, from torchvision itself
            reference = torchvision.models.get_model(arch)
        stages = [getattr(reference, f"layer{i}") for i in range(1, 5)]
        block = type(stages[0][0])
        self._norm_layer, self.inplanes, self.dilation, self.groups, self.base_width = nn.BatchNorm2d, width, 1, 1, 64
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for i, stage in enumerate(stages):
            setattr(self, f"layer{i + 1}", self._make_layer(block, width * 2**i, len(stage), stride=1 if i == 0 else 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, 1000)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


def build_backbone(arch: str, weights: str) -> tuple[nn.Module, int]:
    """A ResNet without its ImageNet classifier, and its feature width."""
    base, width = parse_arch(arch)
    if weights not in ("imagenet", "none"):
        raise ValueError(f"model.weights must be 'imagenet' or 'none', got {weights!r}")
    if width != 64:
        if weights == "imagenet":
            raise ValueError(f"no ImageNet weights exist for {arch}; use model.weights=none, or model.arch={base}")
        net = NarrowResNet(base, width)
    else:
        enum = _imagenet_weights(base) if weights == "imagenet" else None  # resnet18_w64 is resnet18
        try:
            net = torchvision.models.get_model(base, weights=enum)
        except (OSError, RuntimeError) as exc:  # URLError is an OSError
            cache = f"{torch.hub.get_dir()}/checkpoints/{enum.url.rsplit('/', 1)[-1]}"
            raise WeightsUnavailable(
                f"could not load the ImageNet weights of {arch} ({exc}). They download to {cache}. "
                "Either train from scratch with model.weights=none (e.g. `dvc exp run -S model.weights=none`), "
                f"or pre-fill the cache: put that file in $TORCH_HOME/hub/checkpoints/ on this machine."
            ) from None
    features = net.fc.in_features
    net.fc = nn.Identity()
    return net, features


def build_model(arch: str, weights: str, head: type[nn.Module]) -> SeverityNet:
    backbone, width = build_backbone(arch, weights)
    return SeverityNet(backbone, head(width))
