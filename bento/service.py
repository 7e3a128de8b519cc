"""The pap-severity BentoML service: the champion model over HTTP.

Two BentoML services (BentoML 1.4, `@bentoml.service` classes):
- `PapSeverity` (public, binds 127.0.0.1 unless `--host`/BENTOML_HOST says otherwise):
  `POST /predict` and `POST /explain` take multipart uploads, decode them under the
  limits of `serve` (pap_severity.serving), preprocess with the training code
  (pap_severity.transforms.eval_transform) and answer JSON.
- `PapSeverityModel` (internal, reached through `bentoml.depends`; its own process): holds the
  model. `forward` is the adaptive-batching endpoint: concurrent /predict requests are
  stacked into one tensor and run in one forward pass (`serve.batch_max_size`,
  `serve.batch_max_latency_ms`; off with `serve.batching: false` or PAP_SEVERITY_BATCHING=0).
  `attribute` runs Integrated Gradients with pap_severity.explain, the code of the reports.

The model is the BentoML model `pap-severity:latest` (PAP_SEVERITY_BENTO_MODEL overrides), put
in the store by `pap-severity bento import` (pap_severity.bento_build.import_champion) from
`models:/pap-severity@champion`: the served fold ensemble (TTA, temperature, referral rule in its
metadata), or an older single model, which answers with `uncertainty: null`. The store is
BENTOML_HOME, else the project's bentoml_home/ (serving.use_project_store), so
`cd bento && bentoml serve` needs no variable after `dvc repro`. GET /docs.json carries the
project's title, version and description and the real error answers (serving.OpenAPIDocs).
Nothing here copies preprocessing, decoding or IG code.
`/readyz` answers within `serve.probe_timeout_ms` (503 while the model service is down or
restarting; pap_severity.serving.ReadinessGuard).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

from pap_severity.serving import use_project_store

# Before BentoML first opens its store: the project's bentoml_home/ when BENTOML_HOME is not set.
use_project_store(Path(__file__).resolve().parent)

import anyio  # noqa: E402
import bentoml  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from pydantic import Field  # noqa: E402

from pap_severity import __version__  # noqa: E402
from pap_severity import explain as ig  # noqa: E402
from pap_severity.serving import (  # noqa: E402
    ROUTES,
    SERVICE_DESCRIPTION,
    ExplainResponse,
    OpenAPIDocs,
    PredictResponse,
    ReadinessGuard,
    RequestError,
    UploadGuard,
    UploadLimits,
    batching_enabled,
    bento_model_tag,
    decode_cell,
    decode_mask_upload,
    error_response,
    fractions_model,
    heatmap,
    load_served_model,
    model_info,
    png_base64,
    predict_responses,
    serve_settings,
    set_pillow_limit,
)
from pap_severity.transforms import eval_transform  # noqa: E402

log = logging.getLogger("pap_severity.service")

CFG = serve_settings()
SERVE = CFG.serve
LIMITS = UploadLimits.from_config(CFG)
BATCHING = batching_enabled(SERVE)
MODEL_TAG = bento_model_tag()

set_pillow_limit(LIMITS)

# Retries of a call to the model service whose connection dropped under it.
CONNECTION_RETRIES = 2


def _connection_dropped(exc: BaseException) -> bool:
    """A connection to the model service that closed under the request (not an error of the request)."""
    try:
        import aiohttp
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, aiohttp.ClientConnectionError)


def _batch_options() -> dict:
    if not BATCHING:
        return {"batchable": False}
    return {"batchable": True, "batch_dim": 0, "max_batch_size": SERVE.batch_max_size,
            "max_latency_ms": SERVE.batch_max_latency_ms}


# runner_connection: BentoML 1.4.40's client to a dependency closes its session every 100
# requests (or 300 s) while other requests are still in flight on it, failing them with
# "Server disconnected" (500s under concurrent load). Never refreshing avoids that; _call also
# retries a dropped connection (forward and attribute are pure).
@bentoml.service(name="pap_severity_model", workers=1, threads=1, traffic={"timeout": 300},
                 runner_connection={"max_requests": 2**31 - 1, "max_age": 1e9})
class PapSeverityModel:
    """The model: batched forward passes and Integrated Gradients (internal)."""

    bento_model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        torch.set_num_threads(SERVE.torch_threads)
        self.served = load_served_model(self.bento_model, SERVE.device)
        self.size = self.served.info.preprocess.image_size
        log.info("serving %s (%s v%s) on %s, batching %s", self.served.info.bento_model, self.served.info.name,
                 self.served.info.version, self.served.device, "on" if BATCHING else "off")

    def _check(self, x: np.ndarray) -> np.ndarray:
        x = np.array(x, dtype=np.float32)  # a writable copy: pickled arrays arrive read-only
        if x.ndim != 4 or x.shape[1:] != (3, self.size, self.size):
            raise bentoml.exceptions.InvalidArgument(
                f"expected preprocessed cells [N, 3, {self.size}, {self.size}], got {list(x.shape)}")
        return x

    @bentoml.api(**_batch_options())
    def forward(self, x: np.ndarray) -> np.ndarray:
        """Preprocessed cells [N, 3, S, S] -> the model's outputs [N, K+1] (logits, then the score)."""
        return self.served.forward(self._check(x))

    @bentoml.api
    def attribute(self, x: np.ndarray) -> dict:
        """IG of preprocessed cells [N, 3, S, S] with the explain settings: attributions, outputs, deltas."""
        images = torch.from_numpy(self._check(x))
        with torch.enable_grad():
            result = ig.integrated_gradients(self.served.bundle, images, CFG.explain)
        return {
            "attributions": result.attributions.numpy(),
            "outputs": result.outputs.numpy(),
            "delta": result.delta.numpy(),
            "relative_delta": result.relative_delta.numpy(),
            "target": result.target,
            "baseline": result.baseline,
        }


def _served_line() -> str:
    """The model this server answers with, in words, for the OpenAPI description."""
    info = model_info(bentoml.models.get(MODEL_TAG))
    ens = info.ensemble
    what = (f"{ens['members']} x {ens['member_arch']} ({ens['variant']}, TTA {ens['tta']})" if ens else info.arch)
    return (f"{info.uri or info.name + ' v' + info.version} ({info.pipeline}, {what}; trained on {info.data_source}; "
            f"BentoML model {info.bento_model})")


ImageField = Annotated[Path, Field(description=(
    "One cell image, any format Pillow reads (BMP, PNG, JPEG, TIFF, ...); grayscale, RGBA, palette and "
    f"16-bit images are converted to RGB, and an EXIF orientation is applied. At most {LIMITS.max_upload_bytes} "
    f"bytes and {LIMITS.max_pixels} pixels; {LIMITS.min_side} to {LIMITS.max_side} pixels a side, the longer "
    f"side at most {LIMITS.max_aspect:g} times the shorter."))]
# Optional[Path] breaks BentoML 1.4's input inference (unhashable FileSchema) and `Path | None`
# loses the file type: a Path field with a None default is both optional and a file.
MASK_DESCRIPTION = (
    "Optional Herlev segmentation mask of the same cell (the `-d.bmp` file: blue nucleus, navy cytoplasm, "
    "red background), the same size as the image, lossless (BMP or PNG: a mask with more than "
    f"{LIMITS.max_mask_off_palette:.0%} of its pixels in other colours is refused). When sent, the answer has "
    "At_N / At_C.")


@bentoml.service(
    name="pap_severity",
    workers=1,
    http={"host": SERVE.host},
    traffic={"timeout": 300},
    description="Severity (normal .. carcinoma in situ, score 1..5) of Pap smear cells, with Integrated Gradients.",
)
class PapSeverity:
    """Severity of one Pap smear cell image, and its Integrated Gradients explanation."""

    bento_model = bentoml.models.BentoModel(MODEL_TAG)
    model = bentoml.depends(PapSeverityModel)

    def __init__(self) -> None:
        torch.set_num_threads(SERVE.torch_threads)
        self.info = model_info(self.bento_model)
        self.ref = self.info.ref()
        self.transform = eval_transform(self.info.preprocess)

    async def _call(self, name: str, x: np.ndarray):
        """The model service's `name` on x; raises RequestError(503) when the batcher sheds the request."""
        dep = self.model
        for attempt in range(CONNECTION_RETRIES + 1):
            try:
                if hasattr(dep, "to_async"):  # a remote proxy when served: the dependency's process batches
                    return await getattr(dep.to_async, name)(x)
                return await anyio.to_thread.run_sync(getattr(dep, name), x)  # in-process (tests, scripts)
            except bentoml.exceptions.ServiceUnavailable:
                # BentoML's adaptive batcher cancels a request whose wait plus estimated compute would
                # pass max_latency_ms (serve.batch_max_latency_ms): load shedding, not a bug.
                raise RequestError(503, "the model is overloaded: this request would have waited longer than "
                                        f"serve.batch_max_latency_ms ({SERVE.batch_max_latency_ms} ms); retry, "
                                        "or raise that limit") from None
            except Exception as exc:
                if attempt == CONNECTION_RETRIES or not _connection_dropped(exc):
                    raise
                log.warning("connection to the model service dropped (%r); retrying %s", exc, name)

    def _prepare(self, image: Path) -> tuple[np.ndarray, bool]:
        im, rotated = decode_cell(image, LIMITS, "image")
        return self.transform(im)[None].numpy(), rotated

    @bentoml.api(route="/predict")
    async def predict(self, image: ImageField) -> PredictResponse:
        """Severity class, class probabilities, severity score 1..5, p(abnormal), the uncertainty of the fold
        ensemble and whether to refer the cell to a cytologist, for one cell.

        Errors: JSON {error, status, field}: 400 bad or missing input (not an image, too small, too
        elongated), 413 too large, 415 not multipart, 503 overloaded.
        """
        try:
            x, rotated = await anyio.to_thread.run_sync(self._prepare, image)
            outputs = await self._call("forward", x)
        except RequestError as exc:
            return error_response(exc)
        return predict_responses(self.info, outputs, rotated)[0]

    def _prepare_cell(self, image: Path, mask: Path | None) -> tuple[ig.Cell, bool]:
        im, rotated = decode_cell(image, LIMITS, "image")
        codes = decode_mask_upload(mask, LIMITS, im.size, "mask") if mask is not None else None
        return ig.prepare_image(im, self.info.preprocess, codes), rotated

    @bentoml.api(route="/explain")
    async def explain(self, image: ImageField, mask: Path = Field(None, description=MASK_DESCRIPTION)
                      ) -> ExplainResponse:
        """Integrated Gradients heat map (base64 PNG, with its colour scale) of the served model's (the fold
        ensemble's) score for one cell, its prediction, and At_N / At_C (plain and area-normalised) when the
        cell's mask is sent. Same code and settings as the reports.

        Errors: JSON {error, status, field}: 400 bad or missing input (not an image, too small, too
        elongated, a mask not in the Herlev colours), 413 too large, 415 not multipart, 503 overloaded.
        """
        try:
            cell, rotated = await anyio.to_thread.run_sync(self._prepare_cell, image, mask)
            result = await self._call("attribute", cell.input[None].numpy())
        except RequestError as exc:
            return error_response(exc)
        am = ig.attribution_map(np.asarray(result["attributions"]))[0]
        png = heatmap(cell.rgb, am)
        pred = predict_responses(self.info, np.asarray(result["outputs"]), rotated)[0]
        relative = np.asarray(result["relative_delta"], dtype=np.float64)
        fractions = fractions_model(ig.attribution_fractions(am, cell.codes)) if cell.codes is not None else None
        return ExplainResponse(
            **pred.model_dump(exclude={"model"}),
            model=self.ref,
            heatmap_png=png_base64(png),
            target=str(result["target"]),
            baseline=str(result["baseline"]),
            n_steps=CFG.explain.n_steps,
            convergence_delta=float(np.asarray(result["delta"])[0]),
            relative_delta=float(relative[0]),
            convergence_warning=ig.convergence_message(torch.from_numpy(relative), CFG.explain),
            image_size=int(am.shape[0]),
            fractions=fractions,
        )


PapSeverity.add_asgi_middleware(UploadGuard, max_upload_bytes=LIMITS.max_upload_bytes, routes=ROUTES)
PapSeverity.add_asgi_middleware(OpenAPIDocs, title="pap-severity", version=__version__,
                                description=lambda: f"{SERVICE_DESCRIPTION}\n\nServing {_served_line()}.")
PapSeverity.add_asgi_middleware(ReadinessGuard, timeout_s=SERVE.probe_timeout_ms / 1000)

__all__ = ["PapSeverity", "PapSeverityModel"]
