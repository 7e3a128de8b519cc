"""Shared fixtures: tiny hand-made Herlev-like folders and the real copies when present."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pap_severity.data.labels import CLASS_FOLDERS
from pap_severity.data.masks import BACKGROUND, CYTOPLASM, NUCLEUS, encode_mask

SHARED = Path(os.environ.get("HERLEV_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets"))
HERLEV_40PX = SHARED / "herlev-40px"
HERLEV_JPG = SHARED / "herlev-jpg"
HERLEV_COUNTS = {
    "normal_superficiel": 74,
    "normal_intermediate": 70,
    "normal_columnar": 98,
    "light_dysplastic": 182,
    "moderate_dysplastic": 146,
    "severe_dysplastic": 197,
    "carcinoma_in_situ": 150,
}


# The files that take longest (most of a minute to a few minutes each, by `pytest --durations`): the
# xdist workers (pyproject addopts: whole files, --no-loadscope-reorder) take them first, so no
# worker is left with one of them at the end while the other idles.
LONGEST_FIRST = ("test_pipeline.py", "test_serving.py", "test_dvc_views.py", "test_tuning.py", "test_registry.py",
                 "test_explain.py", "test_training.py", "test_trust.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-file order kept


def require(path: Path) -> Path:
    if not path.is_dir():
        pytest.skip(f"real Herlev copy not found at {path} (see ../shared/datasets/README.md)")
    return path


@pytest.fixture
def herlev_40px() -> Path:
    return require(HERLEV_40PX)


@pytest.fixture
def herlev_jpg() -> Path:
    return require(HERLEV_JPG)


def write_cell(folder: Path, stem: str, seed: int, size: int = 32, nucleus_radius: int = 5,
               with_mask: bool = True) -> Path:
    """One small cell: a random image and a mask with a round nucleus inside a round cytoplasm."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    image = folder / f"{stem}.BMP"
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(image)
    if with_mask:
        yy, xx = np.mgrid[:size, :size]
        r2 = (yy - size / 2) ** 2 + (xx - size / 2) ** 2
        codes = np.full((size, size), BACKGROUND, np.uint8)
        codes[r2 <= (size / 2.5) ** 2] = CYTOPLASM
        codes[r2 <= nucleus_radius**2] = NUCLEUS
        encode_mask(codes).save(folder / f"{stem}-d.bmp")
    return image


@pytest.fixture
def tiny_herlev(tmp_path: Path) -> Path:
    """8 cells in each of the 7 class folders, nested one level down as in the smear2005 zip."""
    root = tmp_path / "smear2005" / "New database pictures"
    for c, name in enumerate(CLASS_FOLDERS):
        for i in range(8):
            write_cell(root / name, f"{c:02d}{i:03d}-{i}", seed=100 * c + i)
    return tmp_path / "smear2005"


@pytest.fixture(scope="session")
def synth_set(tmp_path_factory) -> dict:
    """The synthetic cells -> manifest -> splits chain every training test starts from, made once.

    6 cells in each of the 7 class folders at 32 px, 2 cv folds and a 20% test part. Tests must
    not write into `root`; copy what they change.
    """
    from pap_severity.config import SplitConfig
    from pap_severity.data.manifest import build_manifest, write_manifest
    from pap_severity.data.splits import make_splits, write_splits
    from pap_severity.data.synth import make_synthetic

    root = tmp_path_factory.mktemp("synth_set")
    make_synthetic(root / "synth", per_class=6, size=32, seed=0, progress=False)
    manifest = build_manifest(root / "synth", progress=False)
    splits = make_splits(manifest, SplitConfig(folds=2, test_fraction=0.2, seed=0))
    return {
        "root": root / "synth",
        "manifest": manifest,
        "splits": splits,
        "manifest_csv": write_manifest(manifest, root / "manifest.csv"),
        "splits_csv": write_splits(splits, root / "splits.csv"),
    }


# The model of every test that builds one: resnet18's blocks at 1/8 of its width (resnet18_w8), so
# that a test trains and exports in a fraction of the time; test_models_pipelines builds full widths.
TINY_ARCH = "resnet18_w8"


def tiny_config(store: Path | None = None, **train):
    """The training settings of the tests that train: TINY_ARCH from scratch at 32 px, 1 epoch of
    batches of 16 on one CPU thread; with `store`, an MLflow SQLite store (experiment pap-test) there."""
    from pap_severity.config import Config

    cfg = Config()
    update = {
        "model": cfg.model.model_copy(update={"arch": TINY_ARCH, "weights": "none", "image_size": 32}),
        "train": cfg.train.model_copy(update={"epochs": 1, "batch_size": 16, "device": "cpu", "threads": 1,
                                              **train}),
    }
    if store is not None:
        update["mlflow"] = cfg.mlflow.model_copy(update={"tracking_uri": f"sqlite:///{store}/mlflow.db",
                                                         "experiment": "pap-test"})
    return cfg.model_copy(update=update)


@pytest.fixture(scope="session")
def tiny_pipeline(synth_set, tmp_path_factory) -> dict:
    """One trained tiny pipeline for every test that needs one: `combined` cross-validated on
    synth_set with tiny_config() (fold models, predictions.csv, training.json under
    `models/combined`), untracked. Trained once; tests copy `models` before changing anything."""
    from pap_severity.training import cross_validate

    root = tmp_path_factory.mktemp("tiny_pipeline")
    cfg = tiny_config()
    cross_validate(cfg, "combined", synth_set["manifest"], synth_set["splits"], root / "models", progress=False)
    return {"config": cfg, "models": root / "models", "pipeline": "combined"}


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory) -> Path:
    import mlflow

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()  # MLflow creates and migrates it
    return path


@pytest.fixture
def mlflow_db(tmp_path, _mlflow_template) -> str:
    """tmp_path/mlflow.db, a real MLflow SQLite store: MLflow makes one per session (its schema
    migrations take seconds) and each test gets a copy (milliseconds). Returns its URI."""
    shutil.copy(_mlflow_template, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
