"""What runs when the bento is built, never while it serves: the champion imported from the MLflow
registry into the BentoML model store, the package wheel, `bentoml build`, and the bento record.

- `import_champion(cfg)` (CLI: `pap-severity bento import`) copies the registered version that
  holds `registry.alias` (`models:/pap-severity@champion`) into the local BentoML model store
  (BENTOML_HOME; when it is not set, the project's bentoml_home/, which `cd bento && bentoml serve`
  then finds by itself: serving.use_project_store) with `bentoml.mlflow.import_model`, as
  `pap-severity:v<version>-<content hash>`,
  with the registered name, version, run id, pipeline, architecture and preprocessing in its
  labels and metadata (what `serving.model_info` reads). The service declares
  `bentoml.models.BentoModel("pap-severity:latest")`, so `bentoml build` records that exact tag
  and `bentoml containerize` / `export` / `push` copy the model into the image or archive: a
  built bento serves without any MLflow store, offline. Re-importing a version makes it
  `latest` again, so `latest` is always the last champion imported.
- `build_wheel` builds the package's wheel offline; `build_bento` then runs `bentoml build` of
  bento/bentofile.yaml (no lock step, no download).
- `bento_record(tag)` is what the bento_build stage writes to reports/bento.json: the tag, the
  store, and the command that serves it from bento/.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from pap_severity.config import Config

# The project this package was installed from (an editable install, or a source checkout).
PROJECT_ROOT = Path(__file__).resolve().parents[2]
BENTOML_HOME_DEFAULT = "~/bentoml"


def project_root(project: str | Path | None = None) -> Path:
    """`project` when given; else the working directory when it holds bento/bentofile.yaml (a DVC
    run of any checkout), else the project the package was installed from."""
    if project is not None:
        return Path(project)
    if (Path.cwd() / "bento" / "bentofile.yaml").is_file():
        return Path.cwd()
    return PROJECT_ROOT


def import_champion(cfg: Config, name: str | None = None, *, alias: str | None = None,
                    version: str | None = None):
    """Copy `models:/<name>@<alias>` (or a version) from the MLflow registry into the BentoML
    model store (BENTOML_HOME) with bentoml.mlflow.import_model; returns the bentoml.Tag.

    The tag is `<name>:v<version>-<content hash[:12]>`. A tag already in the store is replaced,
    so that it becomes `<name>:latest`, the model the service serves by default.
    """
    from pap_severity.serving import use_project_store

    use_project_store(project_root() / "bento")
    import bentoml
    from bentoml.exceptions import NotFound

    from pap_severity.registry import downloaded_version, find_version
    from pap_severity.tracking import redact, tracking_uri

    name = name or cfg.registry.model_name
    mv = find_version(cfg, name, alias=alias, version=version)
    how = f"version {mv.version}" if version is not None else f"@{alias or cfg.registry.alias} (version {mv.version})"
    digest = mv.tags.get("content_hash", "")
    tag = bentoml.Tag(name, f"v{mv.version}-{digest[:12]}" if digest else f"v{mv.version}")
    try:
        bentoml.models.get(tag)
    except NotFound:
        pass
    else:
        bentoml.models.delete(tag)
    with downloaded_version(cfg, name, str(mv.version)) as (local, meta):
        if "preprocess" not in meta or "pipeline" not in meta or "arch" not in meta:
            raise ValueError(f"models:/{name}/{mv.version} has no pipeline/arch/preprocess metadata; "
                             "register it with pap_severity.registry.register")
        labels = {
            "registered_model": name,
            "registered_version": str(mv.version),
            "pipeline": str(meta["pipeline"]),
            "arch": str(meta["arch"]),
            "data_source": str(mv.tags.get("data_source", "unknown")),
            "content_hash": digest[:12] or "unknown",
        }
        ensemble = meta.get("ensemble")  # registry.served_metadata; absent for an older single model
        labels["served"] = str(ensemble["variant"]) if ensemble else "single"
        metadata = {
            "registered_model": name,
            "registered_version": str(mv.version),
            "model_uri": f"models:/{name}/{mv.version}",
            "imported_as": how,
            "run_id": mv.run_id or "",
            "tracking_uri": redact(tracking_uri(cfg)),
            "pipeline": str(meta["pipeline"]),
            "arch": str(meta["arch"]),
            "preprocess": json.dumps(meta["preprocess"]),
            "score_column": int(meta.get("score_column", -1)),
            "content_hash": digest,
            "data_source": str(mv.tags.get("data_source", "unknown")),
            "ensemble": json.dumps(ensemble) if ensemble else "",
        }
        saved = bentoml.mlflow.import_model(tag, local, labels=labels, metadata=metadata)
    return saved.tag


def build_wheel(dest: str | Path | None = None, project: str | Path | None = None) -> Path:
    """Build the package's wheel offline (pip wheel --no-deps --no-build-isolation --no-index)
    into `dest` (default <project>/bento/wheels), replacing older ones; the bento ships it."""
    import shutil
    import subprocess
    import sys

    project = project_root(project)
    if not (project / "pyproject.toml").is_file():
        raise FileNotFoundError(f"{project}: no pyproject.toml; pass the project root")
    dest = Path(dest) if dest else project / "bento" / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # Built from a clean copy: no stale build/ or egg-info of the working tree gets in, none is left there.
        source = Path(tmp) / "project"
        source.mkdir()
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (project / name).is_file():
                shutil.copy2(project / name, source / name)
        shutil.copytree(project / "src", source / "src",
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
        wheels = Path(tmp) / "wheels"
        done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                               "--no-index", "--quiet", "--wheel-dir", str(wheels), str(source)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"pip wheel failed:\n{done.stdout}\n{done.stderr}")
        built = sorted(wheels.glob("pap_severity-*.whl"))
        if len(built) != 1:
            raise RuntimeError(f"expected one pap_severity wheel, pip wheel made {[p.name for p in built]}")
        for old in dest.glob("pap_severity-*.whl"):
            old.unlink()
        return Path(shutil.copy2(built[0], dest / built[0].name))


def build_bento(project: str | Path | None = None):
    """`bentoml build` of <project>/bento/bentofile.yaml (after building the wheel); returns the bento tag.
    Needs the model in the BentoML store (import_champion) and no network."""
    import contextlib

    from pap_severity.serving import use_project_store

    project = project_root(project)
    use_project_store(project / "bento")
    import bentoml

    build_wheel(project=project)
    ctx = (project / "bento").resolve()
    # bentoml resolves python.wheels against the working directory, not build_ctx.
    with contextlib.chdir(ctx):
        bento = bentoml.bentos.build_bentofile(str(ctx / "bentofile.yaml"), build_ctx=str(ctx))
    return bento.tag


def bento_record(tag, home: str | Path | None = None, project: str | Path | None = None) -> dict:
    """reports/bento.json: the bento tag, its BentoML store, and the command that serves it from bento/.

    The store (BENTOML_HOME, else ~/bentoml) is written relative to bento/ when it lies inside
    the project, so the record holds on another checkout of the same project; the project's own
    store (serving.project_store) needs no variable to serve."""
    from pap_severity.serving import project_store

    home = Path(home if home is not None else os.environ.get("BENTOML_HOME", BENTOML_HOME_DEFAULT)).expanduser()
    project = Path(project) if project is not None else Path.cwd()
    own = project_store(project / "bento")
    serve = "cd bento && bentoml serve" if own is not None and home.resolve() == own else None
    if home.is_absolute() and home.is_relative_to(project):
        home = Path("..") / home.relative_to(project)
    return {"bento": str(tag), "bentoml_home": home.as_posix(),
            "serve": serve or f"cd bento && BENTOML_HOME={home.as_posix()} bentoml serve"}


__all__ = ["PROJECT_ROOT", "bento_record", "build_bento", "build_wheel", "import_champion", "project_root"]
