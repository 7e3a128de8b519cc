"""What the BentoML service (bento/service.py) runs at request time: settings, the request and
readiness guards, image decoding under limits, the response models, and the served model.
(What runs when the bento is built, the import of the champion and `bentoml build`, is in
pap_severity.bento_build.)

The model the server runs
-------------------------
`load_served_model` opens the BentoML model `bento_build.import_champion` made: the MLflow pt2
archive (torch.export) gives the weights; they go into an ordinary eager nn.Module
(`eager_module`: the fold ensemble that the metadata's `ensemble` describes, k SeverityNets with
their normalisation, TTA and temperature; or, for an older version, one SeverityNet), because
Integrated Gradients needs `.eval()` and gradients, which an exported module refuses, and a
pt2 module cannot move to a GPU. Before serving, the two must give the same outputs on
`registry.reference_inputs` (a white cell and seeded noise; max |difference| <=
OUTPUT_TOLERANCE, NaN matching NaN), else the server refuses to start. `eager_module` is the one
place that knows which module to rebuild. Preprocessing is `transforms.eval_transform(Preprocess)`
from the model's metadata: the code training used, not a copy. `info_from_mlflow` builds the same
ModelInfo from a registered version without BentoML (`pap-severity predict`).

Answers
-------
`prediction_rows` turns the model's outputs into the answer's fields, for the server and
`pap-severity predict` alike: a served ensemble's columns (ensemble.COLUMNS) give the calibrated
probabilities, the score, `uncertainty` (entropy, score_std, mutual_info, disagreement; the last
three null with one member, and a note) and `refer` by the model's referral rule (its measure
above its threshold, selective.refer); an older model's [logits..., score] give the same
severity fields with `uncertainty: null`, `uncertainty_reason` and `refer: false`. Every answer
names the model and its `data_source`, with a `caveat` unless it was trained on Herlev.
`OpenAPIDocs` gives /docs.json the project's title, version and description, and documents the
400/413/415/503 answers with the ErrorResponse schema they really have. `use_project_store`:
with no BENTOML_HOME, the service and `pap-severity bento import` use the project's
bentoml_home/.

Requests (hardening)
--------------------
`UploadGuard`, an ASGI middleware in front of /predict and /explain, answers every malformed
request with a 4xx JSON `{"error": ..., "status": ..., "field": ...}` before BentoML parses it:
a wrong Content-Type (415), an empty body (400), a body over the limit (413: checked on
Content-Length first, then while reading, so an oversize upload is never read whole), a
malformed multipart body (400), a missing, repeated, unknown, text (not file) or empty field
(400). BentoML would otherwise fetch a text field that holds a URL: the guard refuses it.
`decode_image` then refuses a file over `serve.max_upload_bytes` (413), an image of more than
`serve.max_pixels` pixels, read from its header before any pixel is decoded (413,
decompression bombs; Pillow's own MAX_IMAGE_PIXELS is set to the same limit), a PNG whose
compressed text metadata passes Pillow's limit (400, saying so), and anything Pillow cannot
decode fully: not an image, truncated, corrupt (400). Grayscale, RGBA, palette and 16-bit
images are converted (transforms.to_rgb), not refused.

`decode_cell` applies what makes an image a cell the model can judge: both sides within
`data.min_size`..`data.max_size` (the sizes the data is validated against; 400 below, 413
above) and the longer side at most `serve.max_aspect` times the shorter (400); and the EXIF
orientation (data.reader.upright), so a photo taken sideways is judged and explained as a
viewer shows it; the answer says `rotated: true` then. `decode_mask_upload` refuses a mask with
more than `serve.max_mask_off_palette` of its pixels in none of the Herlev mask colours (400):
At_N / At_C from a lossy (JPEG) or foreign mask would be wrong numbers that look right, and
the mask is optional, so the client can send the lossless `-d.bmp`, or none.

Readiness
---------
`ReadinessGuard` answers GET /readyz within `serve.probe_timeout_ms`: BentoML's own check (it
asks the model service's /readyz) when it answers in time, else 503 JSON at the deadline, and
503 at once when that check fails (a model worker killed or restarting). BentoML 1.4 lets an
error of that check escape past its request timeout, which left the probe pending for
`traffic.timeout` (300 s) and blocked the server's shutdown; here no probe outlives its deadline.

Settings
--------
`serve_settings()`: the params file named by PAP_SEVERITY_PARAMS, else `params.yaml` in the
working directory or its parent (the project root when serving from bento/), else the
defaults; PAP_SEVERITY_BATCHING=0|1 overrides `serve.batching`.

`serve.batch_max_latency_ms` is BentoML's `max_latency_ms`, which BentoML 1.4 enforces as a
deadline, not a batching window: a queued request whose wait plus estimated compute would
pass it is cancelled and answered 503 (the service says so in its JSON). Set it to the
latency you would rather refuse than exceed (seconds on a CPU), not to a few milliseconds.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from pap_severity.config import Config, ServeConfig, load_config
from pap_severity.data.labels import SEVERITY_NAMES
from pap_severity.data.masks import BORDER_RGB, EDGE_RGB, UNKNOWN, decode_mask
from pap_severity.data.reader import upright

log = logging.getLogger(__name__)

PARAMS_ENV = "PAP_SEVERITY_PARAMS"
BATCHING_ENV = "PAP_SEVERITY_BATCHING"
BENTO_MODEL_ENV = "PAP_SEVERITY_BENTO_MODEL"
MLFLOW_FOLDER = "mlflow_model"  # where bentoml.mlflow.import_model puts the MLflow model
READYZ = "/readyz"
OUTPUT_TOLERANCE = 1e-4
# Multipart framing allowed on top of the files themselves.
MULTIPART_OVERHEAD = 64 * 1024


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------


def _flag(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{BATCHING_ENV}={value!r}: use 1 or 0")


def serve_settings(params: str | Path | None = None) -> Config:
    """The config the server runs with (see the module docstring for where it comes from)."""
    path = params or os.environ.get(PARAMS_ENV)
    if path:
        cfg = load_config(path)
    else:
        found = [p for p in (Path.cwd() / "params.yaml", Path.cwd().parent / "params.yaml") if p.is_file()]
        cfg = load_config(found[0]) if found else Config()
    if os.environ.get(BATCHING_ENV):
        serve = cfg.serve.model_copy(update={"batching": _flag(os.environ[BATCHING_ENV])})
        cfg = cfg.model_copy(update={"serve": serve})
    return cfg


def batching_enabled(serve: ServeConfig) -> bool:
    """Adaptive batching is on when asked for and a batch can hold more than one image."""
    return serve.batching and serve.batch_max_size >= 2


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


class RequestError(Exception):
    """An error the client is told about: an HTTP status (4xx; 503 when overloaded) and a message."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


class ErrorResponse(BaseModel):
    """The body of every 4xx answer of /predict and /explain."""

    error: str = Field(description="What is wrong with the request, in words.")
    status: int = Field(description="The HTTP status code, repeated.")
    field: str | None = Field(None, description="The multipart field at fault, when there is one.")


def error_body(exc: RequestError) -> dict:
    return ErrorResponse(error=exc.message, status=exc.status, field=exc.field).model_dump()


def error_response(exc: RequestError):
    from starlette.responses import JSONResponse

    headers = {"Retry-After": "1"} if exc.status == 503 else None
    return JSONResponse(error_body(exc), status_code=exc.status, headers=headers)


# --------------------------------------------------------------------------------------
# Decoding uploads under limits
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadLimits:
    """What an upload may be. The defaults past the first two check nothing (tests, benchmarks)."""

    max_upload_bytes: int
    max_pixels: int
    min_side: int = 1  # data.min_size
    max_side: int | None = None  # data.max_size
    max_aspect: float | None = None  # serve.max_aspect
    max_mask_off_palette: float = 1.0  # serve.max_mask_off_palette

    @classmethod
    def from_config(cls, cfg: Config) -> UploadLimits:
        serve = cfg.serve
        return cls(serve.max_upload_bytes, serve.max_pixels, min_side=cfg.data.min_size, max_side=cfg.data.max_size,
                   max_aspect=serve.max_aspect, max_mask_off_palette=serve.max_mask_off_palette)


def set_pillow_limit(limits: UploadLimits) -> None:
    """Pillow's decompression-bomb guard at the server's pixel limit (it raises above twice that)."""
    Image.MAX_IMAGE_PIXELS = limits.max_pixels


def _read_upload(source: bytes | str | Path, limits: UploadLimits, field: str) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        path = Path(source)
        size = path.stat().st_size
        if size > limits.max_upload_bytes:
            raise RequestError(413, f"{field}: the file has {size} bytes, more than the limit of "
                                    f"{limits.max_upload_bytes} bytes", field)
        data = path.read_bytes()
    if not data:
        raise RequestError(400, f"{field}: the file is empty (0 bytes)", field)
    if len(data) > limits.max_upload_bytes:
        raise RequestError(413, f"{field}: the file has {len(data)} bytes, more than the limit of "
                                f"{limits.max_upload_bytes} bytes", field)
    return data


def decode_image(source: bytes | str | Path, limits: UploadLimits, field: str = "image") -> Image.Image:
    """A fully decoded image (first frame) from an upload, or a RequestError saying why not.

    The pixel count is read from the header and checked before any pixel is decoded.
    """
    data = _read_upload(source, limits, field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            width, height = im.size
            if width < 1 or height < 1:
                raise RequestError(400, f"{field}: the image has no pixels ({width}x{height})", field)
            if width * height > limits.max_pixels:
                raise RequestError(413, f"{field}: the image is {width}x{height} = {width * height} pixels, "
                                        f"more than the limit of {limits.max_pixels}", field)
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            im.load()
            return im
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RequestError(413, f"{field}: the image has more pixels than the limit of {limits.max_pixels} "
                                f"(decompression bomb guard: {exc})", field) from None
    except UnidentifiedImageError:
        raise RequestError(400, f"{field}: not an image Pillow can read ({len(data)} bytes that are no "
                                "known image format)", field) from None
    except OSError as exc:
        if "truncated" in str(exc).lower():
            raise RequestError(400, f"{field}: the image is truncated ({exc})", field) from None
        raise RequestError(400, f"{field}: the image cannot be decoded ({exc})", field) from None
    except ValueError as exc:
        if "MAX_TEXT" in str(exc):  # PngImagePlugin.MAX_TEXT_CHUNK / MAX_TEXT_MEMORY: metadata, not pixels
            raise RequestError(400, f"{field}: the PNG carries text metadata (a compressed zTXt/iTXt chunk) that "
                                    f"decompresses past Pillow's safety limit of {PngImagePlugin.MAX_TEXT_CHUNK} "
                                    f"bytes a chunk ({PngImagePlugin.MAX_TEXT_MEMORY} in all); the pixels may be "
                                    "fine: save the image again without its text metadata (e.g. `mogrify -strip`) "
                                    "and send that", field) from None
        raise RequestError(400, f"{field}: the image is corrupt (ValueError: {exc})", field) from None
    except Exception as exc:  # Pillow raises many types on corrupt data (SyntaxError, ValueError, ...)
        raise RequestError(400, f"{field}: the image is corrupt ({type(exc).__name__}: {exc})", field) from None


def check_cell_size(size: tuple[int, int], limits: UploadLimits, field: str = "image") -> None:
    """A RequestError unless a cell of `size` (W, H) fits the side and aspect limits."""
    w, h = size
    short, long = min(w, h), max(w, h)
    if short < limits.min_side:
        raise RequestError(400, f"{field}: the image is {w}x{h} pixels; a cell image must be at least "
                                f"data.min_size = {limits.min_side} pixels a side", field)
    if limits.max_side is not None and long > limits.max_side:
        raise RequestError(413, f"{field}: the image is {w}x{h} pixels; a cell image must be at most "
                                f"data.max_size = {limits.max_side} pixels a side: crop it around the cell", field)
    if limits.max_aspect is not None and long > limits.max_aspect * short:
        raise RequestError(400, f"{field}: the image is {w}x{h} pixels, {long / short:.1f} times longer than wide; "
                                f"at most serve.max_aspect = {limits.max_aspect:g}: send one cell, cropped around it",
                           field)


def decode_cell(source: bytes | str | Path, limits: UploadLimits, field: str = "image") -> tuple[Image.Image, bool]:
    """A cell image from an upload (decode_image, then the size and aspect limits), turned upright by
    its EXIF orientation; and whether that turned it."""
    im = decode_image(source, limits, field)
    check_cell_size(im.size, limits, field)
    return upright(im)


def off_palette_share(rgb: np.ndarray, codes: np.ndarray) -> float:
    """Share of a mask's pixels in none of the Herlev mask colours: the mask decoder (data.masks)
    could not place them (its `codes`: UNKNOWN) and they are not the border grey or edge black."""
    rgb = np.asarray(rgb)
    known = (rgb == BORDER_RGB).all(axis=-1) | (rgb == EDGE_RGB).all(axis=-1)
    return float(((codes == UNKNOWN) & ~known).mean())


def decode_mask_upload(source: bytes | str | Path, limits: UploadLimits, size: tuple[int, int],
                       field: str = "mask") -> np.ndarray:
    """Region codes (data.masks) of an uploaded Herlev `-d.bmp` mask of the (upright) image's size (W, H)."""
    im, _ = upright(decode_image(source, limits, field))
    if im.size != size:
        raise RequestError(400, f"{field}: the mask is {im.size[0]}x{im.size[1]} but the image is "
                                f"{size[0]}x{size[1]}; send the image's own -d.bmp mask", field)
    rgb = np.asarray(im.convert("RGB"))
    codes = decode_mask(rgb)
    share = off_palette_share(rgb, codes)
    if share > limits.max_mask_off_palette:
        raise RequestError(400, f"{field}: {share:.1%} of the mask's pixels are none of the Herlev mask colours "
                                "(nucleus blue, cytoplasm navy, background red, border grey, edge black), more than "
                                f"serve.max_mask_off_palette = {limits.max_mask_off_palette:.0%}; send the cell's "
                                "own -d.bmp as it is (lossless: BMP or PNG, never JPEG), or no mask", field)
    return codes


# --------------------------------------------------------------------------------------
# The request guard (ASGI middleware)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouteSpec:
    """The multipart fields a route takes: required and optional file fields."""

    required: tuple[str, ...]
    optional: tuple[str, ...] = ()

    @property
    def fields(self) -> tuple[str, ...]:
        return self.required + self.optional


ROUTES = {"/predict": RouteSpec(("image",)), "/explain": RouteSpec(("image",), ("mask",))}


class UploadGuard:
    """Checks POSTs to the routes of `routes` before BentoML sees them (see the module docstring).

    The body (at most len(fields) * max_upload_bytes + MULTIPART_OVERHEAD bytes) is read and
    parsed here, then replayed to the app unchanged.
    """

    def __init__(self, app, *, max_upload_bytes: int, routes: dict[str, RouteSpec] | None = None,
                 prefix: str = "") -> None:
        self.app = app
        self.max_upload_bytes = int(max_upload_bytes)
        self.routes = {prefix.rstrip("/") + path: spec for path, spec in (routes or ROUTES).items()}

    def limit(self, spec: RouteSpec) -> int:
        return len(spec.fields) * self.max_upload_bytes + MULTIPART_OVERHEAD

    async def __call__(self, scope, receive, send) -> None:
        spec = self.routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if spec is None or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        try:
            body = await self._check(scope, receive, spec)
        except RequestError as exc:
            await error_response(exc)(scope, receive, send)
            return
        if body is None:  # the client went away
            return
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _check(self, scope, receive, spec: RouteSpec) -> bytes | None:
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        ctype = headers.get("content-type", "")
        media = ctype.split(";")[0].strip().lower()
        expected = f"multipart/form-data with the file field{'s' if len(spec.fields) > 1 else ''} " + \
            " and ".join(f"'{f}'" + ("" if f in spec.required else " (optional)") for f in spec.fields)
        if media != "multipart/form-data":
            raise RequestError(415, f"wrong Content-Type {ctype or '(none)'!r}: send {expected}")
        if not re.search(r"boundary=", ctype, re.IGNORECASE):
            raise RequestError(400, "multipart/form-data without a boundary parameter in its Content-Type")
        limit = self.limit(spec)
        declared = headers.get("content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                raise RequestError(400, f"invalid Content-Length {declared!r}") from None
            if n > limit:
                raise RequestError(413, f"the request body has {n} bytes, more than the limit of {limit} "
                                        f"bytes ({self.max_upload_bytes} bytes a file)")
            if n == 0:
                raise RequestError(400, f"empty request body: send {expected}")
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                raise RequestError(413, f"the request body is more than the limit of {limit} bytes "
                                        f"({self.max_upload_bytes} bytes a file)")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if not body:
            raise RequestError(400, f"empty request body: send {expected}")
        await self._check_form(scope, body, spec, expected)
        return body

    async def _check_form(self, scope, body: bytes, spec: RouteSpec, expected: str) -> None:
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartException
        from starlette.requests import Request

        sent = False

        async def once():
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        request = Request(scope, once)
        try:
            form = await request.form(max_files=len(spec.fields) + 2, max_fields=len(spec.fields) + 8)
        except MultiPartException as exc:
            raise RequestError(400, f"malformed multipart body: {exc}") from None
        except Exception as exc:  # the parser's own errors on garbage (HTTPException 400 in starlette 1.x)
            detail = getattr(exc, "detail", None) or f"{type(exc).__name__}: {exc}"
            raise RequestError(400, f"malformed multipart body: {detail}") from None
        try:
            names = list(dict.fromkeys(form.keys()))
            unknown = [n for n in names if n not in spec.fields]
            if unknown:
                raise RequestError(400, f"unknown field(s) {unknown}: send {expected}", unknown[0])
            for name in spec.fields:
                values = form.getlist(name)
                if not values:
                    if name in spec.required:
                        raise RequestError(400, f"missing field {name!r}: send {expected}", name)
                    continue
                if len(values) > 1:
                    raise RequestError(400, f"field {name!r} given {len(values)} times; send one file", name)
                value = values[0]
                if not isinstance(value, UploadFile):
                    raise RequestError(400, f"field {name!r} must be a file upload (multipart part with a "
                                            "filename), not a text value", name)
                size = value.size if value.size is not None else len(await value.read())
                if size == 0:
                    raise RequestError(400, f"{name}: the file is empty (0 bytes)", name)
                if size > self.max_upload_bytes:
                    raise RequestError(413, f"{name}: the file has {size} bytes, more than the limit of "
                                            f"{self.max_upload_bytes} bytes", name)
        finally:
            await form.close()


class ReadinessGuard:
    """GET /readyz answered within `timeout_s`, whatever happens behind it (see the module docstring):
    the app's own answer when it comes in time, else a 503 JSON ErrorResponse."""

    def __init__(self, app, *, timeout_s: float, path: str = READYZ) -> None:
        self.app = app
        self.timeout_s = float(timeout_s)
        self.path = path

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path") != self.path:
            await self.app(scope, receive, send)
            return
        messages: list[dict] = []

        async def keep(message) -> None:
            messages.append(message)

        try:
            await asyncio.wait_for(self.app(scope, receive, keep), self.timeout_s)
        except TimeoutError:
            problem = (f"no answer within serve.probe_timeout_ms = {self.timeout_s * 1000:.0f} ms "
                       "(starting, restarting or overloaded)")
        except Exception as exc:  # the readiness check itself failed: the model service is gone
            problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        else:
            if any(m.get("type") == "http.response.start" for m in messages):
                for message in messages:
                    await send(message)
                return
            problem = "the readiness check sent no answer"
        log.warning("/readyz: not ready: %s", problem)
        await error_response(RequestError(503, f"not ready: the model service is unavailable: {problem}"))(
            scope, receive, send)


# --------------------------------------------------------------------------------------
# The OpenAPI document (ASGI middleware)
# --------------------------------------------------------------------------------------

OPENAPI_PATH = "/docs.json"
# Every error status /predict and /explain answer, with the ErrorResponse body.
ERROR_STATUSES = {
    400: "Bad input: not an image, truncated, empty, a missing/unknown/repeated field, a text field instead of a "
         "file, malformed multipart, a cell too small or too elongated, a mask not in the Herlev colours.",
    413: "Too large: the body, a file (serve.max_upload_bytes), the pixels (serve.max_pixels) or a side "
         "(data.max_size).",
    415: "Not multipart/form-data: send the image as a file field of a multipart form.",
    503: "Overloaded: the request would have waited longer than serve.batch_max_latency_ms; retry (Retry-After).",
}
SERVICE_DESCRIPTION = (
    "Severity of one Pap smear cell image (normal .. carcinoma in situ, and a score 1..5), how sure the model is "
    "(entropy, spread over the fold models), whether to refer the cell to a cytologist, and an Integrated "
    "Gradients heat map of the model's score. POST a multipart form with the file field `image` (and, for "
    "/explain, optionally `mask`: the cell's Herlev -d.bmp, for At_N / At_C). Errors are JSON "
    "{error, status, field}.")


def openapi_document(spec: dict, *, title: str, version: str, description: str,
                     routes: tuple[str, ...] = tuple(ROUTES)) -> dict:
    """BentoML's OpenAPI document with the project's title, version and description, and the
    error answers `routes` really give (ERROR_STATUSES, with the ErrorResponse schema) in place of
    BentoML's generic 400 {error, detail} and 404."""
    spec["info"] = {"title": title, "version": version, "description": description}
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas["ErrorResponse"] = ErrorResponse.model_json_schema()
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for route in routes:
        operation = spec.get("paths", {}).get(route, {}).get("post")
        if operation is None:
            continue
        responses = operation.setdefault("responses", {})
        for code in ("400", "404"):
            responses.pop(code, None)
        responses.update({str(code): {"description": text, "content": error} for code, text in ERROR_STATUSES.items()})
    return spec


class OpenAPIDocs:
    """GET /docs.json (the Swagger page's source) answered with `openapi_document` of BentoML's;
    `description` may be a callable, asked at the first request (the model is known by then)."""

    def __init__(self, app, *, title: str, version: str, description, path: str = OPENAPI_PATH) -> None:
        self.app = app
        self.path = path
        self.title, self.version, self.description = title, version, description

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path") != self.path or scope.get("method") != "GET":
            await self.app(scope, receive, send)
            return
        start, chunks = None, []

        async def keep(message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, keep)
        body = b"".join(chunks)
        if start is not None and start["status"] == 200:
            if callable(self.description):
                self.description = self.description()
            body = json.dumps(openapi_document(json.loads(body), title=self.title, version=self.version,
                                               description=self.description)).encode()
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            start = {**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        if start is None:
            return
        await send(start)
        await send({"type": "http.response.body", "body": body, "more_body": False})


# --------------------------------------------------------------------------------------
# Response models
# --------------------------------------------------------------------------------------


class ModelRef(BaseModel):
    """Which registered model answered, and what it was trained on."""

    name: str = Field(description="Registered model name in the MLflow Model Registry, e.g. pap-severity.")
    version: str = Field(description="Registered model version (the one holding the champion alias when imported).")
    uri: str = Field(description="The MLflow model URI of that version, models:/<name>/<version>.")
    pipeline: str = Field(description="Training pipeline of the model (classification, regression, combined, "
                                      "corn or sord).")
    bento_model: str = Field(description="Tag of the model in the BentoML model store / bento.")
    data_source: str = Field(description="What the model was trained and measured on: herlev (real Herlev Pap smear "
                                         "cells), synthetic (generated shapes, for testing the software only) or "
                                         "unknown (registered without the tag).")
    caveat: str | None = Field(None, description="Present when the answer should not be read as a judgement of a "
                                                 "real cell: the model was not trained on real cells.")


class Uncertainty(BaseModel):
    """How sure the served fold ensemble is about one cell (pap_severity.ensemble)."""

    entropy: float = Field(description="Entropy of the calibrated class probabilities, in nats: 0 = sure of one "
                                       "class, ln 5 = 1.609 = no idea.")
    score_std: float | None = Field(description="Standard deviation over the ensemble's members of their severity "
                                                "scores (1..5 scale). Null when the model has one member (see note).")
    mutual_info: float | None = Field(description="Mutual information between the class and the member (BALD): "
                                                  "how much the members disagree about the class probabilities, "
                                                  "in nats. Null with one member.")
    disagreement: float | None = Field(description="Share of the members whose class differs from the ensemble's "
                                                   "(0..1). Null with one member.")
    members: int = Field(description="Number of models averaged (k fold models, or 1: the final model).")
    tta: str = Field(description="Test-time augmentation: dihedral8 (each cell seen in its 8 rotations/mirrors, "
                                 "averaged) or none.")
    note: str | None = Field(None, description="Why a measure is null (one member: a spread over members is "
                                               "undefined, not 0).")


class PredictResponse(BaseModel):
    """The severity of one cell, how sure the model is, and whether to refer it to a cytologist."""

    model_config = ConfigDict(protected_namespaces=())

    severity: str = Field(description=f"Predicted severity class, one of {', '.join(SEVERITY_NAMES)}.")
    severity_index: int = Field(ge=0, le=len(SEVERITY_NAMES) - 1,
                                description="Index of the severity class: 0 normal .. 4 carcinoma in situ.")
    probabilities: dict[str, float] = Field(
        description="Probability of each severity class, by class name (they sum to 1): the served ensemble's mean "
                    "over members and poses, after its temperature (calibrated on cells no model trained on). For "
                    "an older single regression model, a Gaussian kernel around the score.")
    severity_score: float = Field(description="Continuous severity score on the 1..5 scale: the mean over members "
                                              "and poses of each member's score (the expected score for classifiers, "
                                              "the regressed score for regression).")
    abnormal_probability: float = Field(ge=0.0, le=1.0,
                                        description="1 - p(normal): probability that the cell is abnormal "
                                                    "(any dysplasia or carcinoma in situ).")
    uncertainty: Uncertainty | None = Field(description="How sure the model is; null for a model registered "
                                                        "without ensemble members or a temperature (see "
                                                        "uncertainty_reason).")
    uncertainty_reason: str | None = Field(None, description="Why uncertainty is null; null otherwise.")
    refer: bool = Field(description="True when a cytologist should look at this cell: its uncertainty is above the "
                                    "model's referral threshold (fitted on the calibration part for a target share "
                                    "of referred cells). False also when the model has no referral rule (then "
                                    "uncertainty is null and uncertainty_reason says why).")
    refer_reason: str | None = Field(None, description="Why the cell is referred: the measure, its value and the "
                                                       "threshold. Present only when refer is true.")
    rotated: bool = Field(False, description="True when the upload carried an EXIF orientation (2 to 8) and was "
                                             "turned upright, as an image viewer shows it, before it was judged; "
                                             "every number here is of the upright image.")
    model: ModelRef = Field(description="The registered model (name, version, data source) that made the "
                                        "prediction.")


class AttributionFractions(BaseModel):
    """At_N / At_C of the paper on the signed map Am, and the same on |Am| (abs_*); null when undefined."""

    nucleus_share: float | None = Field(description="Nucleus pixels / all pixels of the (squared, resized) mask.")
    cytoplasm_share: float | None = Field(description="Cytoplasm pixels / all pixels.")
    at_n: float | None = Field(description="At_N = sum(Am over nucleus) / sum(Am).")
    at_c: float | None = Field(description="At_C = sum(Am over cytoplasm) / sum(Am).")
    at_ratio: float | None = Field(description="At_N / At_C = sum(Am over nucleus) / sum(Am over cytoplasm).")
    at_n_norm: float | None = Field(description="Area-normalised At_N = At_N / nucleus_share (1: as much as "
                                                "its size).")
    at_c_norm: float | None = Field(description="Area-normalised At_C = At_C / cytoplasm_share.")
    abs_at_n: float | None = Field(description="At_N on |Am|.")
    abs_at_c: float | None = Field(description="At_C on |Am|.")
    abs_at_ratio: float | None = Field(description="At_N / At_C on |Am|.")
    abs_at_n_norm: float | None = Field(description="Area-normalised At_N on |Am|.")
    abs_at_c_norm: float | None = Field(description="Area-normalised At_C on |Am|.")
    net_fraction: float | None = Field(description="|sum Am| / sum |Am|: 1 = no cancellation; small = signed "
                                                   "fractions unstable.")


class ExplainResponse(PredictResponse):
    """Integrated Gradients of the served model's (the ensemble's) output for one cell, with its prediction."""

    heatmap_png: str = Field(description="Base64 PNG: the attribution map |Am| (IG summed over channels) over the "
                                         "cell as the model sees it (padded square, resized, enlarged), with its "
                                         "colour scale at the right (the |Am| each colour stands for).")
    target: str = Field(description="What IG attributes (explain.target): the score or the predicted class.")
    baseline: str = Field(description="IG baseline (explain.baseline), e.g. white.")
    n_steps: int = Field(description="IG integration steps (explain.n_steps).")
    convergence_delta: float = Field(description="sum(attributions) - (F(x) - F(baseline)).")
    relative_delta: float = Field(description="|delta| / max(|F(x) - F(baseline)|, 1e-3); large: raise n_steps.")
    image_size: int = Field(description="Side in pixels of the model's input, where the map lives.")
    convergence_warning: str | None = Field(
        None, description="Present when relative_delta exceeds explain.delta_threshold: the attributions do not add "
                          "up to the output change, so the heat map and At_N / At_C are approximate (raise "
                          "explain.n_steps). Null when IG converged.")
    fractions: AttributionFractions | None = Field(
        None, description="At_N / At_C and their area-normalised versions; present only when a mask is sent.")


def _finite(v: float) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def prediction_fields(probs: np.ndarray, label: int, score: float) -> dict:
    """The severity fields of a response from one row of a decoded Prediction."""
    probs = np.asarray(probs, dtype=np.float64)
    return {
        "severity": SEVERITY_NAMES[int(label)],
        "severity_index": int(label),
        "probabilities": {name: float(p) for name, p in zip(SEVERITY_NAMES, probs)},
        "severity_score": float(score),
        "abnormal_probability": float(min(1.0, max(0.0, 1.0 - probs[0]))),
    }


ONE_MEMBER_NOTE = ("one member (k = 1, the final model): a spread over members (score_std, mutual_info, "
                   "disagreement) is undefined, not 0")


def prediction_rows(info: ModelInfo, outputs) -> list[dict]:
    """The fields of a PredictResponse (severity, probabilities, uncertainty, refer) for each row of
    the served model's outputs: a fold ensemble's ensemble.COLUMNS, decoded by ensemble.decode and
    judged by the model's referral rule (selective.refer); an older model without members or a
    temperature ([logits..., score]), decoded by its pipeline, with `uncertainty: null` and why.
    `pap-severity predict` and the service both answer through this."""
    import torch

    from pap_severity.pipelines import get_pipeline

    out = torch.from_numpy(np.array(outputs, dtype=np.float32))  # a copy: arrays from the model service are read-only
    if info.ensemble is None:
        pred = get_pipeline(info.pipeline).decode(out)
        reason = (f"{info.name} v{info.version} was registered without ensemble members or a temperature (a single "
                  "model of an older version): it has no uncertainty and no referral rule; register the served "
                  "model (`dvc repro register`, then `pap-severity bento import`) to get them")
        return [{**prediction_fields(pred.probs[i].numpy(), int(pred.label[i]), float(pred.score[i])),
                 "uncertainty": None, "uncertainty_reason": reason, "refer": False, "refer_reason": None}
                for i in range(len(pred.label))]
    from pap_severity.ensemble import UNCERTAINTY, decode
    from pap_severity.selective import refer

    ens = info.ensemble
    rule = ens["referral"]
    pred = decode(out, info.pipeline)
    values = {name: pred.uncertainty[name].numpy() for name in UNCERTAINTY}
    referred = refer(values[rule["measure"]], rule["threshold"])
    rows = []
    for i in range(len(pred.label)):
        uncertainty = {name: _finite(values[name][i]) for name in UNCERTAINTY}
        value = uncertainty[rule["measure"]]
        why = None
        if referred[i]:
            why = (f"{rule['measure']} {value:.4g} is above the referral threshold {rule['threshold']:.4g} (chosen on "
                   f"the calibration part so that at most {rule['max_rate']:.0%} of cells are referred): a "
                   "cytologist should look at this cell")
        rows.append({
            **prediction_fields(pred.probs[i].numpy(), int(pred.label[i]), float(pred.score[i])),
            "uncertainty": Uncertainty(**uncertainty, members=int(ens["members"]), tta=str(ens["tta"]),
                                       note=None if int(ens["members"]) > 1 else ONE_MEMBER_NOTE),
            "uncertainty_reason": None, "refer": bool(referred[i]), "refer_reason": why,
        })
    return rows


def predict_responses(info: ModelInfo, outputs, rotated: bool = False) -> list[PredictResponse]:
    """One PredictResponse per row of the served model's outputs (prediction_rows); `rotated`: the
    images were turned upright by their EXIF orientation."""
    ref = info.ref()
    return [PredictResponse(**row, rotated=rotated, model=ref) for row in prediction_rows(info, outputs)]


def fractions_model(values: dict[str, float]) -> AttributionFractions:
    return AttributionFractions(**{k: _finite(values[k]) for k in AttributionFractions.model_fields})


def png_base64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


# The heat map is enlarged to about this many pixels a side (nearest), so small inputs stay visible.
HEATMAP_SIDE = 256


def heatmap(rgb: np.ndarray, am: np.ndarray) -> bytes:
    """The PNG of /explain and `pap-severity predict --explain`: |Am| over the cell as the model sees
    it, enlarged to about HEATMAP_SIDE pixels, with its colour scale."""
    from pap_severity.explain import heatmap_png

    return heatmap_png(rgb, am, upscale=max(1, HEATMAP_SIDE // max(1, am.shape[0])), colorbar=True)


# --------------------------------------------------------------------------------------
# The model, loaded for serving
# --------------------------------------------------------------------------------------


STORE_FOLDER = "bentoml_home"  # the project's BentoML store: <project>/bentoml_home


def project_store(bento_dir: str | Path) -> Path | None:
    """<project>/bentoml_home when `bento_dir` is a project's bento/ folder (it holds bentofile.yaml);
    None elsewhere (a built bento, a container), where BentoML's own default holds."""
    bento_dir = Path(bento_dir).resolve()
    return bento_dir.parent / STORE_FOLDER if (bento_dir / "bentofile.yaml").is_file() else None


def use_project_store(bento_dir: str | Path) -> str | None:
    """BENTOML_HOME for this process and the workers it starts: the one exported, else the project's
    store (project_store), so `cd bento && bentoml serve` finds what `dvc repro` imported with no
    variable set. Must run before BentoML first opens its store. Returns the store in use (None:
    BentoML's default)."""
    if os.environ.get("BENTOML_HOME"):
        return os.environ["BENTOML_HOME"]
    home = project_store(bento_dir)
    if home is None:
        return None
    os.environ["BENTOML_HOME"] = str(home)  # the workers (copies of this environment) read it
    _repoint_bentoml(home)
    return str(home)


def _repoint_bentoml(home: Path) -> None:
    """Point this process's BentoML at `home` when it has opened its default store already.

    `bentoml serve` and `bentoml build` resolve the store (BENTOML_HOME, else ~/bentoml) once,
    before they import the service; BentoML's loader swaps the model store the same way for a
    bento's own. BentoML has no public setting for it (checked for 1.4.40)."""
    import sys

    if "bentoml" not in sys.modules:
        return  # nothing resolved yet: BENTOML_HOME will be read
    from bentoml._internal.bento import BentoStore
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore

    for folder in ("models", "bentos", "tmp"):
        (home / folder).mkdir(parents=True, exist_ok=True)
    BentoMLContainer.bentoml_home.set(str(home))
    BentoMLContainer.model_store.set(ModelStore(str(home / "models")))
    BentoMLContainer.bento_store.set(BentoStore(str(home / "bentos")))


def info_from_mlflow(meta: dict, *, name: str, version: str, data_source: str, bento_model: str = "") -> ModelInfo:
    """ModelInfo of a registered version from its MLflow model metadata (registry.load_champion's meta)."""
    from pap_severity.transforms import Preprocess

    pre = meta["preprocess"]
    return ModelInfo(name=name, version=str(version), uri=f"models:/{name}/{version}", pipeline=str(meta["pipeline"]),
                     arch=str(meta["arch"]), preprocess=pre if isinstance(pre, Preprocess) else
                     Preprocess.from_json(json.dumps(pre)), bento_model=bento_model, data_source=data_source,
                     ensemble=meta.get("ensemble") or None, extra=dict(meta))


def bento_model_tag() -> str:
    """The BentoML model the service serves: PAP_SEVERITY_BENTO_MODEL, else pap-severity:latest."""
    return os.environ.get(BENTO_MODEL_ENV) or f"{Config().registry.model_name}:latest"


@dataclass
class ModelInfo:
    """What the server says and needs about its model, read from the BentoML model's metadata."""

    name: str
    version: str
    uri: str
    pipeline: str
    arch: str
    preprocess: Any  # transforms.Preprocess
    bento_model: str
    data_source: str = "unknown"
    # registry.served_metadata's `ensemble` (members, member_arch, tta, temperature, referral); None: an
    # older single model without them.
    ensemble: dict | None = None
    extra: dict = field(default_factory=dict)

    def ref(self) -> ModelRef:
        return ModelRef(name=self.name, version=self.version, uri=self.uri, pipeline=self.pipeline,
                        bento_model=self.bento_model, data_source=self.data_source,
                        caveat=data_caveat(self.data_source))


def data_caveat(data_source: str) -> str | None:
    """What a user must know before reading an answer as a judgement of a real cell (None for Herlev)."""
    if data_source == "herlev":
        return None
    if data_source == "synthetic":
        return ("trained on synthetic cells (generated shapes, to test the software), not on real Pap smears: this "
                "answer says nothing about a real cell")
    return "the data this model was trained on is not recorded: do not read this answer as a judgement of a real cell"


def model_info(bento_model) -> ModelInfo:
    """ModelInfo of a bentoml.Model imported by bento_build.import_champion."""
    from pap_severity.transforms import Preprocess

    meta = dict(bento_model.info.metadata)
    missing = {"registered_model", "registered_version", "pipeline", "arch", "preprocess"} - set(meta)
    if missing:
        raise ValueError(f"BentoML model {bento_model.tag} lacks {sorted(missing)} in its metadata; "
                         "import it with `pap-severity bento import` (bento_build.import_champion)")
    ensemble = meta.get("ensemble")
    return ModelInfo(
        name=str(meta["registered_model"]),
        version=str(meta["registered_version"]),
        uri=str(meta.get("model_uri", "")),
        pipeline=str(meta["pipeline"]),
        arch=str(meta["arch"]),
        preprocess=Preprocess.from_json(meta["preprocess"]),
        bento_model=str(bento_model.tag),
        data_source=str(meta.get("data_source", "unknown")),
        ensemble=json.loads(ensemble) if isinstance(ensemble, str) and ensemble else None,
        extra=meta,
    )


@dataclass
class ServedModel:
    """The model as the server runs it: an eager nn.Module on its device, and its bundle for IG."""

    bundle: Any  # checkpoints.ModelBundle
    info: ModelInfo
    device: Any  # torch.device

    def forward(self, x: np.ndarray) -> np.ndarray:
        """[N, 3, S, S] float32 -> [N, K+1] float32 (no gradients)."""
        import torch

        with torch.inference_mode():
            return self.bundle.model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
                                     .to(self.device)).float().cpu().numpy()


def load_served_model(bento_model, device: str = "auto") -> ServedModel:
    """The imported model as an eager nn.Module on `device` (auto: CUDA when present), checked
    against the exported MLflow model it came from."""
    import mlflow

    info = model_info(bento_model)
    path = bento_model.path_of(MLFLOW_FOLDER)
    exported = mlflow.pytorch.load_model(path)
    logged = dict(mlflow.models.Model.load(path).metadata or {})
    if logged.get("pipeline") != info.pipeline or logged.get("arch") != info.arch:
        raise ValueError(f"{bento_model.tag}: the MLflow model says {logged.get('pipeline')}/{logged.get('arch')}, "
                         f"the BentoML metadata {info.pipeline}/{info.arch}")
    return served_from_module(exported, info, device)


def eager_module(info: ModelInfo):
    """A fresh eager nn.Module of the model's kind, to receive the exported weights: the fold
    ensemble (pap_severity.ensemble.FoldEnsemble of k SeverityNets, its TTA) that registry.served_metadata
    describes, or, for an older model, one SeverityNet of info's arch and pipeline head. Serving
    another nn.Module (one tensor out, score last) means rebuilding it here from its metadata."""
    from pap_severity.models import build_model
    from pap_severity.pipelines import get_pipeline

    head = get_pipeline(info.pipeline).head
    if info.ensemble is None:
        return build_model(info.arch, "none", head)
    from pap_severity.ensemble import FoldEnsemble, Normalized

    ens = info.ensemble  # members' normalisation and the temperature are buffers: the state dict brings them
    members = [Normalized(build_model(ens["member_arch"], "none", head), info.preprocess)
               for _ in range(int(ens["members"]))]
    return FoldEnsemble(members, info.pipeline, tta=ens["tta"], temperature=float(ens["temperature"]))


def served_from_module(source, info: ModelInfo, device: str = "auto") -> ServedModel:
    """`eager_module(info)` with the weights of `source` (the exported module, or any module with the
    same state dict), checked to give source's outputs on registry.reference_inputs, on `device`."""
    import torch

    from pap_severity.checkpoints import ModelBundle
    from pap_severity.devices import resolve_device
    from pap_severity.pipelines import get_pipeline, served
    from pap_severity.registry import reference_inputs

    model = eager_module(info)
    state = {k: v.detach().to("cpu") for k, v in source.state_dict().items()}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{info.bento_model}: weights do not fit {info.arch}/{info.pipeline}: "
                         f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    model.eval()
    x = torch.from_numpy(reference_inputs(info.preprocess))
    with torch.no_grad():
        want = source(x).float()
        got = model(x).float()
    # NaN where both are NaN is a match: a one-member ensemble's spread columns are NaN by design.
    gap = torch.where(torch.isnan(want) & torch.isnan(got), torch.zeros_like(want), (want - got).abs())
    diff = float(gap.max())
    if not diff <= OUTPUT_TOLERANCE:
        raise RuntimeError(f"{info.bento_model}: the rebuilt model differs from the exported one by {diff:g}")
    dev = resolve_device(device)
    if dev.type == "mps":
        dev = torch.device("cpu")
    if dev.type == "cuda":
        # Full float32 convolutions and matmuls: TF32 (cuDNN's default for convolutions) moves the
        # outputs ~1e-3 away from the registered model's CPU outputs; at this size it costs nothing.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    model.to(dev)
    pipeline = get_pipeline(info.pipeline)
    bundle = ModelBundle(model=model, pipeline=served(pipeline) if info.ensemble else pipeline, arch=info.arch,
                         preprocess=info.preprocess, meta={"bento_model": info.bento_model})
    return ServedModel(bundle=bundle, info=info, device=dev)


__all__ = [
    "AttributionFractions",
    "ERROR_STATUSES",
    "ErrorResponse",
    "ExplainResponse",
    "HEATMAP_SIDE",
    "ModelInfo",
    "ModelRef",
    "OpenAPIDocs",
    "PredictResponse",
    "ROUTES",
    "ReadinessGuard",
    "RequestError",
    "RouteSpec",
    "SERVICE_DESCRIPTION",
    "STORE_FOLDER",
    "ServedModel",
    "Uncertainty",
    "UploadGuard",
    "UploadLimits",
    "batching_enabled",
    "bento_model_tag",
    "check_cell_size",
    "data_caveat",
    "decode_cell",
    "decode_image",
    "decode_mask_upload",
    "eager_module",
    "error_body",
    "error_response",
    "fractions_model",
    "heatmap",
    "info_from_mlflow",
    "load_served_model",
    "model_info",
    "off_palette_share",
    "openapi_document",
    "predict_responses",
    "prediction_fields",
    "prediction_rows",
    "project_store",
    "serve_settings",
    "served_from_module",
    "set_pillow_limit",
    "use_project_store",
]
