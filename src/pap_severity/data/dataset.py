"""A torch Dataset over manifest rows: decoded and squared once, augmented every epoch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from pap_severity.config import AugmentConfig
from pap_severity.data.reader import open_image
from pap_severity.transforms import Preprocess, augment_transform, eval_transform, square_resize


def _open(path: str) -> Image.Image:
    """The upright image, or a ValueError that names the file."""
    try:
        return open_image(path)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


class CellDataset(Dataset):
    """(image tensor, severity) pairs. Images are kept in memory after padding and resizing:
    Herlev is small, and decoding BMPs every epoch would dominate CPU training time."""

    def __init__(
        self,
        paths: Sequence[str],
        severities: Sequence[int],
        pre: Preprocess,
        augment: AugmentConfig | None = None,
    ) -> None:
        if len(paths) != len(severities):
            raise ValueError(f"{len(paths)} paths but {len(severities)} labels")
        self.paths = list(paths)
        self.severities = torch.as_tensor(list(severities), dtype=torch.long)
        self.images: list[Image.Image] = [square_resize(_open(p), pre.image_size) for p in self.paths]
        if augment is None:
            self.transform = eval_transform(pre)
        else:
            self.transform = augment_transform(pre, augment)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[i]), self.severities[i]
