"""The BentoML service for real: a tiny model is trained, registered as pap-severity@champion in a
temporary MLflow store, imported into a temporary BentoML store, and served by a real
`bentoml serve` subprocess (from bento/, found through bentofile.yaml) on a free loopback port.
Everything is called over HTTP with httpx. No mocks.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import psutil
import pytest
import torch
import yaml
from PIL import Image, ImageOps, PngImagePlugin

from pap_severity import explain as ig
from pap_severity.config import SplitConfig
from pap_severity.data.labels import SEVERITY_NAMES
from pap_severity.data.manifest import build_manifest
from pap_severity.data.masks import read_mask
from pap_severity.data.splits import make_splits
from pap_severity.data.synth import make_synthetic
from pap_severity.ensemble import decode
from pap_severity.explain.heatmap import COLORBAR_PX
from pap_severity.serving import (
    RequestError,
    UploadLimits,
    decode_cell,
    decode_image,
    decode_mask_upload,
    off_palette_share,
)
from pap_severity.transforms import eval_transform

ROOT = Path(__file__).resolve().parents[1]
BENTO_DIR = ROOT / "bento"
BENTOML = Path(sys.executable).parent / "bentoml"
MAX_UPLOAD = 200_000
MAX_PIXELS = 200_000
PROBE_TIMEOUT_MS = 1000
TOL = 1e-5

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def server_params(root: Path, tracking_uri: str) -> Path:
    params = {
        "model": {"image_size": 32},
        "train": {"batch_size": 16, "device": "cpu", "channels_last": False, "amp": False, "epochs": 1,
                  "threads": 1},
        "serve": {"host": "127.0.0.1", "max_upload_bytes": MAX_UPLOAD, "max_pixels": MAX_PIXELS,
                  "batch_max_size": 8, "batch_max_latency_ms": 10_000, "torch_threads": 1, "batching": True,
                  "probe_timeout_ms": PROBE_TIMEOUT_MS},
        # Every explanation is "over the threshold", so each answer must carry the warning.
        "explain": {"delta_threshold": 0.0},
        "mlflow": {"tracking_uri": tracking_uri, "experiment": "serving-test"},
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def ensemble_spec(root: Path, member: Path, cells) -> Path:
    """A served-model spec (models/ensemble/<pipeline>.json, as the ensemble stage writes it) of two
    members: the trained model and a copy with its head moved (so they disagree), the 8 poses, a
    temperature, and a referral threshold at the median entropy of `cells` (some referred, some not)."""
    from pap_severity.checkpoints import load_bundle, save_bundle
    from pap_severity.stages import served_bundle
    from pap_severity.trust import sha256

    bundle, _ = load_bundle(member)
    other = root / "combined-other.pt"
    with torch.no_grad():
        for p in list(bundle.model.parameters())[-2:]:  # the last layer
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    save_bundle(bundle, other)
    spec = {"version": 1, "pipeline": "combined", "variant": "ensemble_tta",
            "members": [{"path": str(p), "sha256": sha256(p)} for p in (member, other)], "tta": "dihedral8",
            "temperature": 1.5, "referral": {"measure": "entropy", "threshold": 0.0, "max_rate": 0.2},
            "image_size": 32, "arch": bundle.arch}
    path = root / "combined.json"
    path.write_text(json.dumps(spec))
    served = served_bundle(path)
    x = torch.stack([eval_transform(served.preprocess)(Image.open(p)) for p in cells["path"]])
    with torch.no_grad():
        spec["referral"]["threshold"] = float(decode(served.model(x), "combined").uncertainty["entropy"].median())
    path.write_text(json.dumps(spec))
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A registry with an older single model (v1) and the served fold ensemble (v2, champion), both
    imported into the project's BentoML store, and `bentoml serve` from the project's bento/ with no
    BENTOML_HOME nor params variable: it finds the store and params.yaml beside bento/."""
    root = tmp_path_factory.mktemp("serving")
    project = root / "project"
    (project / "bento").mkdir(parents=True)
    for name in ("service.py", "bentofile.yaml"):
        shutil.copy2(BENTO_DIR / name, project / "bento" / name)
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    params = server_params(project, tracking)
    unset = ("BENTOML_HOME", "PAP_SEVERITY_PARAMS", "PAP_SEVERITY_BATCHING", "PAP_SEVERITY_BENTO_MODEL",
             "MLFLOW_TRACKING_URI")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env |= {"BENTOML_DO_NOT_TRACK": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", tracking)
        mp.chdir(root)
        from pap_severity.config import load_config
        from pap_severity.registry import load_champion, register
        from pap_severity.stages import served_bundle
        from pap_severity.training import train_final

        cfg = load_config(params)
        make_synthetic(root / "synth", per_class=4, size=32, seed=0, progress=False)
        manifest = build_manifest(root / "synth", progress=False)
        splits = make_splits(manifest, SplitConfig(folds=2, test_fraction=0.25, seed=0))
        cells = manifest.sort_values("path").groupby("severity").head(1).reset_index(drop=True)
        single = train_final(cfg, "combined", manifest, splits, root / "combined.pt", progress=False)
        old = register(cfg, single, {"accuracy": 0.5}, data_source="synthetic")  # an older version: one model
        spec = ensemble_spec(root, root / "combined.pt", cells)
        bundle = served_bundle(spec)
        reg = register(cfg, bundle, {"accuracy": 0.5}, data_source="synthetic")
        assert reg.promoted and reg.version != old.version
        loaded = load_champion(cfg)

    imported = subprocess.run(
        [sys.executable, "-c", "import sys; from pap_severity.config import load_config; "
         "from pap_severity.bento_build import import_champion; cfg = load_config(sys.argv[1]); "
         "[print(import_champion(cfg, version=v)) for v in sys.argv[2:]]",
         str(params), old.version, reg.version],
        cwd=project, env={**env, "MLFLOW_TRACKING_URI": tracking}, capture_output=True, text=True, timeout=300)
    assert imported.returncode == 0, imported.stderr[-3000:]
    old_tag, tag = imported.stdout.strip().splitlines()[-2:]
    assert (project / "bentoml_home" / "models" / "pap-severity").is_dir()  # the project's store, by default

    proc, url, log = start_server(env, root / "serve.log", project / "bento")
    client = httpx.Client(base_url=url, timeout=120)
    try:
        yield {"url": url, "client": client, "cfg": cfg, "bundle": bundle, "loaded": loaded, "reg": reg, "old": old,
               "tag": tag, "old_tag": old_tag, "spec": json.loads(spec.read_text()), "cells": cells,
               "log": root / "serve.log", "root": root, "project": project, "proc": proc, "env": env,
               "tracking": tracking, "params": params}
    finally:
        client.close()
        stop_server(proc)
        log.close()


def start_server(env: dict, log_path: Path, bento_dir: Path = BENTO_DIR) -> tuple[subprocess.Popen, str, object]:
    """`bentoml serve` from a bento/ folder on a free loopback port, once /readyz says 200: (process, url, log file)."""
    port = free_port()
    log = log_path.open("w")
    proc = subprocess.Popen([str(BENTOML), "serve", "--port", str(port)], cwd=bento_dir, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        if proc.poll() is not None:
            log.close()
            raise RuntimeError(f"bentoml serve exited ({proc.returncode}):\n{log_path.read_text()[-5000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop_server(proc)
            log.close()
            raise RuntimeError(f"bentoml serve not ready in time:\n{log_path.read_text()[-5000:]}")
        time.sleep(1)


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL for the server and every worker it started (workers have their own sessions)."""
    try:
        workers = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        workers = []
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    _, alive = psutil.wait_procs(workers, timeout=10)
    for worker in alive:
        worker.kill()


def in_process(served, image: Image.Image):
    """The served fold ensemble, built in this process from its spec, on the cell's preprocessing."""
    bundle = served["bundle"]
    x = eval_transform(bundle.preprocess)(image)[None]
    with torch.no_grad():
        return decode(bundle.model(x), "combined")


def assert_matches(body: dict, pred, spec: dict, i: int = 0) -> None:
    """A /predict (or /explain) answer holds the ensemble's numbers for row i, and its referral decision."""
    probs = [body["probabilities"][name] for name in SEVERITY_NAMES]
    assert np.allclose(probs, pred.probs[i].numpy(), atol=TOL, rtol=0), (probs, pred.probs[i])
    assert abs(body["severity_score"] - float(pred.score[i])) <= TOL
    assert body["severity_index"] == int(pred.label[i])
    assert body["severity"] == SEVERITY_NAMES[int(pred.label[i])]
    assert abs(body["abnormal_probability"] - (1 - float(pred.probs[i, 0]))) <= TOL
    u = body["uncertainty"]
    for name in ("entropy", "score_std", "mutual_info", "disagreement"):
        assert u[name] is not None and abs(u[name] - float(pred.uncertainty[name][i])) <= 1e-4, (name, u)
    assert u["members"] == 2 and u["tta"] == "dihedral8" and u["note"] is None
    assert body["uncertainty_reason"] is None
    rule = spec["referral"]
    assert body["refer"] is bool(float(pred.uncertainty[rule["measure"]][i]) > rule["threshold"])
    assert (body["refer_reason"] is not None) == body["refer"]
    assert body["model"]["data_source"] == "synthetic" and "synthetic" in body["model"]["caveat"]


def post_image(served, data: bytes, name: str = "cell.bmp", route: str = "/predict", **extra) -> httpx.Response:
    files = {"image": (name, data, "application/octet-stream"), **extra}
    return served["client"].post(route, files=files)


def good_cell(served) -> Path:
    return Path(served["cells"].loc[0, "path"])


def assert_still_serving(served) -> None:
    r = post_image(served, good_cell(served).read_bytes())
    assert r.status_code == 200, r.text
    assert served["client"].get("/readyz").status_code == 200


# --------------------------------------------------------------------------------------
# Endpoints
# --------------------------------------------------------------------------------------


def test_health_and_metrics(served):
    c = served["client"]
    for path in ("/healthz", "/livez", "/readyz"):
        assert c.get(path).status_code == 200, path
    post_image(served, good_cell(served).read_bytes())
    metrics = c.get("/metrics")
    assert metrics.status_code == 200
    assert 'endpoint="/predict"' in metrics.text and "bentoml_service_request" in metrics.text


def test_serves_the_projects_store_with_no_variable(served):
    """The server was started from the project's bento/ with no BENTOML_HOME: it serves the model that exists
    only in <project>/bentoml_home, and says which."""
    assert "BENTOML_HOME" not in served["env"] and "PAP_SEVERITY_PARAMS" not in served["env"]
    version = served["tag"].split(":")[1]
    assert (served["project"] / "bentoml_home" / "models" / "pap-severity" / version).is_dir()
    body = post_image(served, good_cell(served).read_bytes()).json()
    assert body["model"]["bento_model"] == served["tag"]


def test_the_project_store_and_the_bento_record(tmp_path):
    from pap_severity.bento_build import bento_record
    from pap_severity.serving import project_store

    (tmp_path / "bento").mkdir()
    assert project_store(tmp_path / "bento") is None  # not a project's bento/: BentoML's default holds
    (tmp_path / "bento" / "bentofile.yaml").write_text("service: service:PapSeverity\n")
    assert project_store(tmp_path / "bento") == tmp_path.resolve() / "bentoml_home"
    own = bento_record("pap-severity:x", home=tmp_path / "bentoml_home", project=tmp_path)
    assert own == {"bento": "pap-severity:x", "bentoml_home": "../bentoml_home", "serve": "cd bento && bentoml serve"}
    other = bento_record("pap-severity:x", home=tmp_path / "elsewhere", project=tmp_path)
    assert other["serve"] == "cd bento && BENTOML_HOME=../elsewhere bentoml serve"


def test_binds_loopback_by_default(served):
    assert f"listening on http://127.0.0.1:{served['url'].rsplit(':', 1)[1]}" in served["log"].read_text()


def _properties(spec: dict, schema: dict) -> dict:
    if "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema.get("properties", {})


def test_openapi_documents_every_field(served):
    spec = served["client"].get("/docs.json").json()
    for route, inputs, output_fields in (
        ("/predict", {"image"}, {"severity", "severity_index", "probabilities", "severity_score",
                                 "abnormal_probability", "rotated", "model", "uncertainty", "uncertainty_reason",
                                 "refer", "refer_reason"}),
        ("/explain", {"image", "mask"}, {"heatmap_png", "severity_score", "fractions", "convergence_warning",
                                         "rotated", "model", "uncertainty", "refer", "refer_reason"}),
    ):
        op = spec["paths"][route]["post"]
        assert op.get("description")
        body = op["requestBody"]["content"]["multipart/form-data"]["schema"]
        props = _properties(spec, body)
        assert set(props) == inputs
        assert all(p.get("description") for p in props.values()), props
        out = _properties(spec, op["responses"]["200"]["content"]["application/json"]["schema"])
        assert output_fields <= set(out)
        assert all(p.get("description") for p in out.values()), [k for k, p in out.items() if not p.get("description")]
        # Every error status these routes answer, with the body they really send.
        responses = op["responses"]
        for status in ("400", "413", "415", "503"):
            assert responses[status].get("description"), status
            ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            assert ref == "#/components/schemas/ErrorResponse", (status, ref)
        assert "404" not in responses
    for name in ("ModelRef", "AttributionFractions", "Uncertainty"):
        fields = spec["components"]["schemas"][name]["properties"]
        assert all(p.get("description") for p in fields.values()), name
    assert set(spec["components"]["schemas"]["ErrorResponse"]["properties"]) == {"error", "status", "field"}
    assert {"score_std", "entropy", "mutual_info", "disagreement"} <= set(
        spec["components"]["schemas"]["Uncertainty"]["properties"])


def test_openapi_metadata_comes_from_the_project(served):
    from pap_severity import __version__

    info = served["client"].get("/docs.json").json()["info"]
    assert info["title"] == "pap-severity" and info["version"] == __version__
    assert "Pap smear" in info["description"] and "BentoML Team" not in json.dumps(info)
    assert f"models:/pap-severity/{served['reg'].version}" in info["description"]
    assert "synthetic" in info["description"]


def test_the_real_error_body_matches_the_documented_schema(served):
    spec = served["client"].get("/docs.json").json()
    documented = set(spec["components"]["schemas"]["ErrorResponse"]["properties"])
    for route, kwargs, status in (("/predict", {"files": {"image": ("x.bmp", b"nope", "image/bmp")}}, 400),
                                  ("/predict", {"json": {"image": "x"}}, 415),
                                  ("/predict", {"files": {"image": ("x", b"B" * (MAX_UPLOAD + 10), "image/bmp")}},
                                   413)):
        r = served["client"].post(route, **kwargs)
        assert r.status_code == status and set(r.json()) == documented, (status, r.text)


def test_predict_equals_in_process_model(served):
    reg = served["reg"]
    for path in served["cells"]["path"]:
        data = Path(path).read_bytes()
        r = post_image(served, data)
        assert r.status_code == 200, r.text
        body = r.json()
        assert_matches(body, in_process(served, Image.open(io.BytesIO(data))), served["spec"])
        assert body["model"]["name"] == "pap-severity"
        assert body["model"]["version"] == reg.version
        assert body["model"]["uri"] == f"models:/pap-severity/{reg.version}"
        assert body["model"]["bento_model"] == served["tag"]
        assert abs(sum(body["probabilities"].values()) - 1) < 1e-5
        assert body["rotated"] is False


def test_concurrent_requests_are_batched(served):
    paths = [Path(p) for p in served["cells"]["path"]] * 4
    batched = False
    for _ in range(3):
        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(lambda p: post_image(served, p.read_bytes()), paths))
        for path, r in zip(paths, responses):
            assert r.status_code == 200, r.text
            assert_matches(r.json(), in_process(served, Image.open(path)), served["spec"])
        text = served["client"].get("/metrics").text
        sums = [float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("bentoml_service_adaptive_batch_size_sum") and "forward" in line]
        counts = [float(line.split()[-1]) for line in text.splitlines()
                  if line.startswith("bentoml_service_adaptive_batch_size_count") and "forward" in line]
        assert sums and counts, "no adaptive batching metric for /forward"
        if sum(sums) > sum(counts):  # some batch held more than one image
            batched = True
            break
    assert batched, "20 concurrent requests never shared a forward pass"


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "P_transparent", "I;16", "1", "CMYK_jpeg", "wide"])
def test_image_modes_are_converted(served, mode):
    rgb = Image.open(good_cell(served)).convert("RGB")
    if mode == "P_transparent":
        image = rgb.convert("P")
        image.info["transparency"] = 0
        data = png_bytes(image)
    elif mode == "I;16":
        a = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        image = Image.fromarray(a)
        assert image.mode == "I;16"
        data = png_bytes(image)
        assert Image.open(io.BytesIO(data)).mode.startswith("I")
    elif mode == "CMYK_jpeg":
        data = png_bytes(rgb.convert("CMYK"), "JPEG")
    elif mode == "wide":  # non-square: padded with the border colour, as in training
        data = png_bytes(rgb.resize((48, 20)))
    elif mode == "RGBA":
        a = np.asarray(rgb.convert("RGBA")).copy()
        a[..., 3] = np.linspace(0, 255, a.shape[1], dtype=np.uint8)[None, :]
        data = png_bytes(Image.fromarray(a, mode="RGBA"))
    else:
        data = png_bytes(rgb.convert(mode))
    r = post_image(served, data, name=f"cell-{mode}.png")
    assert r.status_code == 200, r.text
    assert_matches(r.json(), in_process(served, Image.open(io.BytesIO(data))), served["spec"])


def _png_image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.fixture(autouse=True)
def _quiet_ig():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ig.ConvergenceWarning)  # a 1-epoch model; the delta is reported, not judged
        yield


def _in_process_ig(served, image: Image.Image, codes=None):
    cell = ig.prepare_image(image, served["bundle"].preprocess, codes)
    result = ig.integrated_gradients(served["bundle"], cell.input[None], served["cfg"].explain)
    return cell, result, ig.attribution_map(result.attributions)[0]


def test_explain_without_mask(served):
    path = good_cell(served)
    r = post_image(served, path.read_bytes(), route="/explain")
    assert r.status_code == 200, r.text
    body = r.json()
    heat = _png_image(body["heatmap_png"])
    # The 256 px overlay with its colour scale at the right.
    assert heat.format == "PNG" and heat.size == (256 + COLORBAR_PX, 256)
    assert body["fractions"] is None
    assert_matches(body, in_process(served, Image.open(path)), served["spec"])
    assert body["image_size"] == 32 and body["baseline"] == "white" and body["n_steps"] == 50
    assert body["model"]["version"] == served["reg"].version
    pred = in_process(served, Image.open(path))
    assert abs(body["severity_score"] - float(pred.score[0])) <= TOL
    _, result, _ = _in_process_ig(served, Image.open(path))
    assert abs(body["convergence_delta"] - float(result.delta[0])) <= 1e-4
    # explain.delta_threshold is 0 here: the answer must say the attributions are approximate.
    assert body["relative_delta"] > 0 and body["rotated"] is False
    assert body["convergence_warning"].startswith("1 of 1 images have a convergence delta above 0 of"), body
    assert "raise explain.n_steps" in body["convergence_warning"]


def test_explain_with_mask_gives_the_reports_fractions(served):
    path = good_cell(served)
    mask = path.with_name(path.stem + "-d.bmp")
    r = post_image(served, path.read_bytes(), route="/explain",
                   mask=(mask.name, mask.read_bytes(), "image/bmp"))
    assert r.status_code == 200, r.text
    body = r.json()
    f = body["fractions"]
    for key in ("at_n", "at_c", "at_n_norm", "at_c_norm", "abs_at_n", "abs_at_c", "nucleus_share"):
        assert f[key] is not None and np.isfinite(f[key]), key
    # The same numbers as the explain code of the reports, computed here on the trained model.
    cell, _, am = _in_process_ig(served, Image.open(path), read_mask(mask))
    expected = ig.attribution_fractions(am, cell.codes)
    for key in ("at_n", "at_c", "at_n_norm", "at_c_norm", "abs_at_n", "abs_at_c", "nucleus_share"):
        assert abs(f[key] - expected[key]) <= 1e-4 * max(1.0, abs(expected[key])), key


def _sideways_jpeg(served) -> tuple[bytes, Image.Image]:
    """A non-square cell stored turned a quarter left with EXIF orientation 6 (a phone held sideways),
    and the image as a viewer shows it."""
    upright_view = Image.open(good_cell(served)).convert("RGB").resize((48, 24))
    exif = Image.Exif()
    exif[0x0112] = 6  # the viewer turns it a quarter right
    buf = io.BytesIO()
    upright_view.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=95, exif=exif)
    data = buf.getvalue()
    shown = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert shown.size == (48, 24)
    return data, shown


def test_exif_orientation_is_applied_and_reported(served):
    data, shown = _sideways_jpeg(served)
    r = post_image(served, data, name="sideways.jpg")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["rotated"] is True
    assert_matches(body, in_process(served, shown), served["spec"])
    r = post_image(served, data, name="sideways.jpg", route="/explain")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["rotated"] is True
    _, result, _ = _in_process_ig(served, shown)
    assert abs(body["severity_score"] - float(result.outputs[0, -1])) <= TOL
    assert abs(body["convergence_delta"] - float(result.delta[0])) <= 1e-4


def test_the_mlflow_pyfunc_model_of_the_champion_gives_the_served_numbers(served, monkeypatch):
    """models:/pap-severity@champion through MLflow's generic pyfunc loader (pt2 inside) answers what /predict does."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", served["tracking"])
    model = mlflow.pyfunc.load_model("models:/pap-severity@champion")
    pre = served["loaded"][1]["preprocess"]
    for path in served["cells"]["path"]:
        x = eval_transform(pre)(Image.open(path))[None].numpy()
        body = post_image(served, Path(path).read_bytes()).json()
        assert_matches(body, decode(torch.from_numpy(np.asarray(model.predict(x))), "combined"), served["spec"])


def test_an_older_model_without_members_serves_with_uncertainty_null(served):
    """v1, registered before the ensemble (one model, no members, no temperature), loads and answers
    through the server's own code, with `uncertainty: null` and the reason, and no referral."""
    import bentoml
    from bentoml._internal.models import ModelStore

    from pap_severity.serving import load_served_model, predict_responses

    store = ModelStore(served["project"] / "bentoml_home" / "models")
    model = load_served_model(bentoml.models.get(served["old_tag"], _model_store=store), "cpu")
    assert model.info.ensemble is None and model.info.version == served["old"].version
    x = torch.stack([eval_transform(model.info.preprocess)(Image.open(p)) for p in served["cells"]["path"]]).numpy()
    answers = predict_responses(model.info, model.forward(x))
    single = model.bundle.pipeline.decode(torch.from_numpy(model.forward(x)))
    for i, answer in enumerate(answers):
        assert answer.uncertainty is None and "without ensemble members" in answer.uncertainty_reason
        assert answer.refer is False and answer.refer_reason is None
        assert abs(answer.severity_score - float(single.score[i])) <= TOL
        assert answer.model.data_source == "synthetic"


def test_predict_command_gives_the_servers_numbers(served, tmp_path):
    """`pap-severity predict` on a folder (cells, their masks, a broken file) and on one file: per cell the
    numbers /predict answers, the heat maps and At_N / At_C of /explain, and a refused file as a row."""
    from typer.testing import CliRunner

    from pap_severity.cli import app

    folder = tmp_path / "cells"
    folder.mkdir()
    for path in map(Path, served["cells"]["path"]):
        for f in (path, path.with_name(path.stem + "-d.bmp")):
            shutil.copy2(f, folder / f.name)
    (folder / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "answers.csv"
    done = CliRunner().invoke(app, ["predict", str(folder), "--out", str(out), "--explain", "--mask-suffix", "-d",
                                    "--params", str(served["params"])])
    assert done.exit_code == 0, done.output
    table = pd.read_csv(out).set_index("path")
    cells = sorted(p for p in folder.iterdir() if not p.stem.endswith("-d") and p.name != "broken.png")
    assert set(table.index) == {str(p) for p in cells} | {str(folder / "broken.png")}  # masks are not cells
    assert "not an image" in table.loc[str(folder / "broken.png"), "error"]
    for path in cells:
        row = table.loc[str(path)]
        body = post_image(served, path.read_bytes()).json()
        for name in SEVERITY_NAMES:
            assert abs(row[f"p_{name}"] - body["probabilities"][name]) <= TOL
        assert abs(row["severity_score"] - body["severity_score"]) <= TOL and row["severity"] == body["severity"]
        for name in ("entropy", "score_std", "mutual_info", "disagreement"):
            assert abs(row[name] - body["uncertainty"][name]) <= TOL, name
        assert bool(row["refer"]) is body["refer"] and row["model_uri"] == body["model"]["uri"]
        assert Image.open(row["heatmap"]).size == (256 + COLORBAR_PX, 256)
    mask = cells[0].with_name(cells[0].stem + "-d.bmp")
    explained = post_image(served, cells[0].read_bytes(), route="/explain",
                           mask=(mask.name, mask.read_bytes(), "image/bmp")).json()
    for key in ("at_n", "at_c", "at_n_norm", "at_c_norm"):
        assert abs(table.loc[str(cells[0]), key] - explained["fractions"][key]) <= 1e-4, key

    # An older version by its URI: the same cell, no uncertainty, and the reason.
    old = tmp_path / "old.csv"
    done = CliRunner().invoke(app, ["predict", str(cells[0]), "--out", str(old), "--model-uri",
                                    f"models:/pap-severity/{served['old'].version}", "--params", str(served["params"])])
    assert done.exit_code == 0, done.output
    row = pd.read_csv(old).iloc[0]
    assert "without ensemble members" in row["uncertainty_reason"] and pd.isna(row["entropy"])
    assert row["model_uri"] == f"models:/pap-severity/{served['old'].version}"


# --------------------------------------------------------------------------------------
# Bad input: a 4xx JSON error that says what is wrong, and the server keeps serving
# --------------------------------------------------------------------------------------


def _multipart(fields: list[tuple[str, str | None, bytes]], boundary: str = "pAp-BoUnDaRy") -> tuple[bytes, dict]:
    parts = []
    for name, filename, data in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        parts.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


def _bomb() -> bytes:
    return png_bytes(Image.new("L", (1000, 1000)))  # 1e6 pixels in a few KB


def _big_text_png() -> bytes:
    """A valid PNG whose compressed text chunk expands past Pillow's limit (3 MB of 'A' in 3 KB)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "A" * 3_000_000, zip=True)
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 150, 180)).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def _random_mask(size: tuple[int, int]) -> bytes:
    return png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)))


def _bad_requests(served) -> dict:
    cell = good_cell(served).read_bytes()
    mask = good_cell(served).with_name(good_cell(served).stem + "-d.bmp").read_bytes()
    size = Image.open(good_cell(served)).size
    jpeg_mask = png_bytes(Image.open(io.BytesIO(mask)).convert("RGB"), "JPEG")
    empty_form, empty_headers = _multipart([])
    text_form, text_headers = _multipart([("image", None, b"http://example.com/cell.png")])

    def chunks():
        for _ in range(4):
            yield b"x" * 100_000

    return {
        # name: (route, httpx.post kwargs, status, words in the message)
        "not_an_image": ("/predict", {"files": {"image": ("x.bmp", b"hello, not a picture", "image/bmp")}},
                         400, "not an image"),
        "truncated": ("/predict", {"files": {"image": ("x.bmp", cell[: len(cell) // 2], "image/bmp")}},
                      400, "truncated"),
        "empty_file": ("/predict", {"files": {"image": ("x.bmp", b"", "image/bmp")}}, 400, "empty"),
        "empty_body": ("/predict", {"content": b"", "headers": empty_headers}, 400, "empty request body"),
        "no_body_at_all": ("/predict", {}, 415, "content-type"),
        "oversize_file": ("/predict", {"files": {"image": ("x.bmp", b"B" * (MAX_UPLOAD + 1000), "image/bmp")}},
                          413, "limit"),
        "oversize_body": ("/predict", {"content": b"x" * (3 * MAX_UPLOAD), "headers": empty_headers}, 413, "limit"),
        "oversize_chunked": ("/predict", {"content": chunks(), "headers": empty_headers}, 413, "limit"),
        "too_many_pixels": ("/predict", {"files": {"image": ("bomb.png", _bomb(), "image/png")}}, 413, "pixels"),
        "missing_field": ("/predict", {"content": empty_form, "headers": empty_headers}, 400, "missing field 'image'"),
        "missing_image_with_mask": ("/explain", {"files": {"mask": ("m.bmp", mask, "image/bmp")}},
                                    400, "missing field 'image'"),
        "wrong_field_name": ("/predict", {"files": {"file": ("x.bmp", cell, "image/bmp")}}, 400, "unknown field"),
        # BentoML would fetch a URL given as text: the guard refuses any text value.
        "text_instead_of_file": ("/predict", {"content": text_form, "headers": text_headers}, 400, "must be a file"),
        "json_body": ("/predict", {"json": {"image": "aGVsbG8="}}, 415, "multipart/form-data"),
        "raw_image_body": ("/predict", {"content": cell, "headers": {"content-type": "image/bmp"}}, 415,
                           "multipart/form-data"),
        "no_boundary": ("/predict", {"content": b"abc", "headers": {"content-type": "multipart/form-data"}},
                        400, "boundary"),
        "malformed_multipart": ("/predict", {"content": b"--nope\r\ngarbage", "headers": empty_headers}, 400,
                                "malformed multipart"),
        "two_images": ("/predict", {"files": [("image", ("a.bmp", cell, "image/bmp")),
                                              ("image", ("b.bmp", cell, "image/bmp"))]}, 400, "2 times"),
        "mask_not_an_image": ("/explain", {"files": {"image": ("x.bmp", cell, "image/bmp"),
                                                     "mask": ("m.bmp", b"nope", "image/bmp")}}, 400, "mask"),
        "mask_wrong_size": ("/explain", {"files": {"image": ("x.bmp", cell, "image/bmp"),
                                                   "mask": ("m.png", png_bytes(Image.new("RGB", (10, 12))),
                                                            "image/png")}}, 400, "10x12"),
        # Degenerate cells: a 4xx naming the limit, not a confident answer.
        "one_pixel": ("/predict", {"files": {"image": ("x.png", png_bytes(Image.new("RGB", (1, 1))), "image/png")}},
                      400, "data.min_size = 16"),
        "strip": ("/predict", {"files": {"image": ("x.png", png_bytes(Image.new("RGB", (5000, 10))), "image/png")}},
                  400, "data.min_size = 16"),
        "elongated": ("/predict", {"files": {"image": ("x.png", png_bytes(Image.new("RGB", (200, 40))), "image/png")}},
                      400, "serve.max_aspect = 4"),
        "side_over_max_size": ("/explain", {"files": {"image": ("x.png", png_bytes(Image.new("RGB", (2100, 80))),
                                                                "image/png")}}, 413, "data.max_size = 2048"),
        "random_colour_mask": ("/explain", {"files": {"image": ("x.bmp", cell, "image/bmp"),
                                                      "mask": ("m.png", _random_mask(size), "image/png")}},
                               400, "none of the herlev mask colours"),
        "jpeg_mask": ("/explain", {"files": {"image": ("x.bmp", cell, "image/bmp"),
                                             "mask": ("m.jpg", jpeg_mask, "image/jpeg")}},
                      400, "never jpeg"),
        "big_text_chunk": ("/predict", {"files": {"image": ("x.png", _big_text_png(), "image/png")}}, 400,
                           "text metadata"),
    }


BAD = ["not_an_image", "truncated", "empty_file", "empty_body", "no_body_at_all", "oversize_file", "oversize_body",
       "oversize_chunked", "too_many_pixels", "missing_field", "missing_image_with_mask", "wrong_field_name",
       "text_instead_of_file", "json_body", "raw_image_body", "no_boundary", "malformed_multipart", "two_images",
       "mask_not_an_image", "mask_wrong_size", "one_pixel", "strip", "elongated", "side_over_max_size",
       "random_colour_mask", "jpeg_mask", "big_text_chunk"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_gets_a_4xx_json_error(served, case):
    route, kwargs, status, words = _bad_requests(served)[case]
    try:
        r = served["client"].post(route, **kwargs)
    except httpx.HTTPError as exc:  # only acceptable if the server cut off an oversize upload
        assert case.startswith("oversize"), f"{case}: {exc!r}"
    else:
        assert r.status_code == status, (case, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json"), r.headers
        body = r.json()
        assert isinstance(body, dict) and body["status"] == status
        assert words.lower() in body["error"].lower(), body
    assert_still_serving(served)


def test_get_is_not_allowed_and_server_lives(served):
    assert served["client"].get("/predict").status_code == 405
    assert_still_serving(served)
    assert served["proc"].poll() is None


# --------------------------------------------------------------------------------------
# The decoding helpers themselves (no server)
# --------------------------------------------------------------------------------------


def test_decode_image_limits_and_modes(tmp_path):
    limits = UploadLimits(max_upload_bytes=50_000, max_pixels=10_000)
    ok = png_bytes(Image.new("I;16", (50, 40)))
    assert decode_image(ok, limits).size == (50, 40)
    with pytest.raises(RequestError) as err:
        decode_image(png_bytes(Image.new("L", (200, 200))), limits)
    assert err.value.status == 413 and "40000 pixels" in err.value.message
    with pytest.raises(RequestError) as err:
        decode_image(b"", limits)
    assert err.value.status == 400 and "empty" in err.value.message
    big = tmp_path / "big.bin"
    big.write_bytes(b"0" * 60_000)
    with pytest.raises(RequestError) as err:
        decode_image(big, limits)
    assert err.value.status == 413 and "60000 bytes" in err.value.message
    with pytest.raises(RequestError) as err:
        decode_mask_upload(png_bytes(Image.new("RGB", (5, 5))), limits, (6, 5))
    assert err.value.status == 400 and err.value.field == "mask"


def test_decode_cell_applies_sizes_aspect_and_orientation():
    limits = UploadLimits(max_upload_bytes=10**6, max_pixels=10**6, min_side=16, max_side=100, max_aspect=4.0)
    for size, status, words in (((1, 1), 400, "data.min_size = 16"), ((500, 10), 400, "data.min_size = 16"),
                                ((101, 40), 413, "data.max_size = 100"), ((90, 20), 400, "serve.max_aspect = 4")):
        with pytest.raises(RequestError) as err:
            decode_cell(png_bytes(Image.new("RGB", size)), limits)
        assert err.value.status == status and words in err.value.message and err.value.field == "image", size
    im, rotated = decode_cell(png_bytes(Image.new("RGB", (80, 20))), limits)
    assert im.size == (80, 20) and not rotated
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (20, 40), (10, 20, 30)).save(buf, "JPEG", exif=exif)
    im, rotated = decode_cell(buf.getvalue(), limits)
    assert im.size == (40, 20) and rotated


def test_png_text_chunk_over_pillows_limit_is_named():
    with pytest.raises(RequestError) as err:
        decode_image(_big_text_png(), UploadLimits(max_upload_bytes=10**6, max_pixels=10**6))
    message = err.value.message
    assert err.value.status == 400 and "corrupt" not in message
    assert "text metadata" in message and str(PngImagePlugin.MAX_TEXT_CHUNK) in message and "without" in message


def test_mask_off_palette_share(tmp_path):
    """Herlev masks hold their five colours only; a JPEG copy or random colours lose many pixels."""
    from pap_severity.data.masks import decode_mask, encode_mask

    yy, xx = np.mgrid[:40, :40]
    codes = np.zeros((40, 40), np.uint8)
    codes[(yy - 20) ** 2 + (xx - 20) ** 2 < 150] = 1
    codes[(yy - 20) ** 2 + (xx - 20) ** 2 < 30] = 2
    codes[:2] = 255  # the grey band
    mask = encode_mask(codes).convert("RGB")
    rgb = np.asarray(mask)
    assert off_palette_share(rgb, decode_mask(rgb)) == 0.0
    jpeg = np.asarray(Image.open(io.BytesIO(png_bytes(mask, "JPEG"))).convert("RGB"))
    assert off_palette_share(jpeg, decode_mask(jpeg)) > 0.05
    limits = UploadLimits(max_upload_bytes=10**6, max_pixels=10**6, max_mask_off_palette=0.05)
    assert (decode_mask_upload(png_bytes(mask), limits, (40, 40)) == decode_mask(rgb)).all()
    with pytest.raises(RequestError) as err:
        decode_mask_upload(png_bytes(mask, "JPEG"), limits, (40, 40))
    assert err.value.status == 400 and err.value.field == "mask" and "serve.max_mask_off_palette = 5%" in err.value.message


def _probe(url: str, timeout: float) -> tuple[int | None, float, str]:
    """GET /readyz: (status or None when the client gave up, seconds, body)."""
    t0 = time.monotonic()
    try:
        r = httpx.get(f"{url}/readyz", timeout=timeout)
    except httpx.HTTPError as exc:
        return None, time.monotonic() - t0, repr(exc)
    return r.status_code, time.monotonic() - t0, r.text


def _model_worker(proc: subprocess.Popen) -> psutil.Process:
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "pap_severity_model" in c.cmdline()]
    assert len(workers) == 1, workers
    return workers[0]


def test_readyz_is_503_while_the_model_worker_restarts_and_sigterm_still_stops_the_server(served):
    """A model worker killed: /readyz answers 503 within serve.probe_timeout_ms, 200 once a new worker
    is up; and a probe sent while the worker is down never keeps SIGTERM from stopping the server."""
    proc, url, log = start_server(served["env"], served["root"] / "serve-restart.log", served["project"] / "bento")
    try:
        worker = _model_worker(proc)
        worker.kill()
        worker.wait(10)
        status, seconds, body = _probe(url, timeout=20)
        assert status == 503 and seconds < PROBE_TIMEOUT_MS / 1000 + 2, (status, seconds, body)
        assert json.loads(body)["error"].startswith("not ready: the model service is unavailable")
        deadline = time.monotonic() + 240  # circus starts a new worker, which loads the model again
        while (status := _probe(url, timeout=20)[0]) != 200 and time.monotonic() < deadline:
            assert status == 503, status
            time.sleep(1)
        assert status == 200, "the model worker never came back"
        files = {"image": ("cell.bmp", good_cell(served).read_bytes(), "image/bmp")}
        assert httpx.post(f"{url}/predict", files=files, timeout=120).status_code == 200

        worker = _model_worker(proc)
        worker.kill()
        worker.wait(10)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(_probe, url, 120)
            time.sleep(PROBE_TIMEOUT_MS / 1000 + 1)
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
            stopped_after = time.monotonic() - t0
            status, seconds, body = pending.result(timeout=180)
        assert status == 503 and seconds < PROBE_TIMEOUT_MS / 1000 + 2, (status, seconds, body)
        assert proc.poll() is not None, f"SIGTERM did not stop the server within 60 s ({stopped_after:.0f} s)"
    finally:
        stop_server(proc)
        log.close()


def test_bentoml_build_works_offline(served, tmp_path):
    """`bentoml build` of a copy of bento/ (so the working tree is untouched): no lock step, no download."""
    import shutil

    from pap_severity.bento_build import build_wheel

    ctx = tmp_path / "bento"
    ctx.mkdir()
    for name in ("service.py", "bentofile.yaml"):
        shutil.copy2(BENTO_DIR / name, ctx / name)
    wheel = build_wheel(ctx / "wheels")
    config = yaml.safe_load((ctx / "bentofile.yaml").read_text())
    assert f"./wheels/{wheel.name}" in config["python"]["wheels"], "bentofile.yaml names another wheel version"
    env = {**os.environ, "BENTOML_HOME": str(served["project"] / "bentoml_home"), "BENTOML_DO_NOT_TRACK": "true",
           "PAP_SEVERITY_PARAMS": str(served["params"]),
           # Any attempt to reach the package index fails at once.
           "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "UV_INDEX_URL": "http://127.0.0.1:9/simple",
           "UV_OFFLINE": "1", "PIP_NO_INDEX": "1"}
    done = subprocess.run([str(BENTOML), "build", "--output", "tag"], cwd=ctx, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    tag = done.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    info = subprocess.run([str(BENTOML), "get", tag, "-o", "json"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert info.returncode == 0, info.stderr[-2000:]
    bento = json.loads(info.stdout)
    models = {m["tag"] for svc in bento["services"] for m in svc.get("models", [])}
    assert served["tag"] in models
    path = served["project"] / "bentoml_home" / "bentos" / tag.replace(":", "/")
    assert (path / "env" / "python" / "wheels" / wheel.name).is_file()
    assert not (path / "env" / "python" / "requirements.lock.txt").exists()


@pytest.mark.parametrize("flag, batchable", [("1", True), ("0", False)])
def test_batching_switch(tmp_path, flag, batchable):
    """PAP_SEVERITY_BATCHING turns adaptive batching of the model's forward on and off."""
    env = {**os.environ, "PAP_SEVERITY_BATCHING": flag, "BENTOML_HOME": str(tmp_path / "bentoml"),
           "BENTOML_DO_NOT_TRACK": "true", "PAP_SEVERITY_PARAMS": str(ROOT / "params.yaml")}
    done = subprocess.run([sys.executable, "-c", "import service; m = service.PapSeverityModel.apis['forward']; "
                           "print(m.batchable, m.max_batch_size, m.max_latency_ms)"],
                          cwd=BENTO_DIR, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    words = done.stdout.split()
    assert words[0] == str(batchable)
    if batchable:
        cfg = yaml.safe_load((ROOT / "params.yaml").read_text())["serve"]
        assert (int(words[1]), int(words[2])) == (cfg["batch_max_size"], cfg["batch_max_latency_ms"])
