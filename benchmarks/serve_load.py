"""Load test of the BentoML service: N concurrent clients POST one cell each to /predict for T seconds.

    python benchmarks/serve_load.py                       # quick resnet18 @ 64 px model, batching on and off
    python benchmarks/serve_load.py --tracking-uri sqlite:///mlflow.db   # the registered champion instead

For each mode (adaptive batching on / off, via PAP_SEVERITY_BATCHING) a real `bentoml serve` is
started from bento/ on a free loopback port, warmed up, loaded by `--clients` threads (one
httpx client each) for `--duration` seconds, and stopped. Printed per mode: requests, errors
(non-200 or transport errors; must be 0), throughput, p50/p99 latency, the mean adaptive batch
size (from /metrics), and the ratio of serving time per image (1 / throughput) to the bare
model's forward time per image, measured in this process right after the load (same weights,
same torch threads as the server: serve.torch_threads), at batch 1 and at batch --clients.

Without --tracking-uri a model like the embedded default's (the params.yaml model section:
resnet18 at model.image_size) is trained for one epoch on a small synthetic set, registered as
pap-severity@champion in a temporary MLflow store and imported into a temporary BentoML store;
all temporary.

serve.batch_max_latency_ms is BentoML's max_latency_ms: a deadline, not a batching window. A
request whose wait plus estimated compute would pass it is refused with 503. The default
here (--max-latency-ms 10000) keeps the count of errors at 0 under this load; pass the
project's value to see what it does.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
BENTO_DIR = ROOT / "bento"
BENTOML = Path(sys.executable).parent / "bentoml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_params(work: Path, tracking_uri: str, args) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["mlflow"] = {**params.get("mlflow", {}), "tracking_uri": tracking_uri, "experiment": "serve-bench"}
    params["train"] = {**params["train"], "epochs": 1, "device": "cpu", "amp": False, "channels_last": False,
                       "threads": 1}
    params["serve"] = {**params["serve"], "batch_max_latency_ms": args.max_latency_ms}
    if args.batch_max_size:
        params["serve"]["batch_max_size"] = args.batch_max_size
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def quick_champion(work: Path, params: Path) -> list[Path]:
    """Train, register and return a few cell images (one per class) of a quick model."""
    os.environ["MLFLOW_TRACKING_URI"] = yaml.safe_load(params.read_text())["mlflow"]["tracking_uri"]
    from pap_severity.config import SplitConfig, load_config
    from pap_severity.data.manifest import build_manifest
    from pap_severity.data.splits import make_splits
    from pap_severity.data.synth import make_synthetic
    from pap_severity.registry import register
    from pap_severity.training import train_final

    cfg = load_config(params)
    size = cfg.synth.size
    make_synthetic(work / "synth", per_class=6, size=size, seed=0, progress=False)
    manifest = build_manifest(work / "synth", progress=False)
    splits = make_splits(manifest, SplitConfig(folds=2, test_fraction=0.25, seed=0))
    t = time.perf_counter()
    bundle = train_final(cfg, cfg.registry.pipeline, manifest, splits, work / "quick.pt", progress=False)
    print(f"trained a quick {bundle.arch} @ {bundle.preprocess.image_size} px in {time.perf_counter() - t:.0f} s")
    reg = register(cfg, bundle, {"accuracy": float("nan")}, data_source="synthetic")
    print(f"registered {reg.name} v{reg.version} ({reg.reason})")
    return [Path(p) for p in manifest.groupby("severity").head(1)["path"]]


def import_model(params: Path, env: dict) -> str:
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from pap_severity.config import load_config; "
         "from pap_severity.bento_build import import_champion; print(import_champion(load_config(sys.argv[1])))",
         str(params)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"import failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


class Server:
    def __init__(self, env: dict, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log.open("w")
        self.proc = subprocess.Popen([str(BENTOML), "serve", "--port", str(self.port)], cwd=BENTO_DIR, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        with httpx.Client(base_url=self.url, timeout=5) as c:
            while True:
                if self.proc.poll() is not None:
                    raise SystemExit(f"bentoml serve exited:\n{log.read_text()[-4000:]}")
                try:
                    if c.get("/readyz").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(f"bentoml serve not ready:\n{log.read_text()[-4000:]}")
                time.sleep(1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


def load(url: str, images: list[bytes], clients: int, duration: float) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = time.perf_counter()
    stop_at = start + duration

    def client(k: int) -> None:
        mine, bad = [], []
        with httpx.Client(base_url=url, timeout=120) as c:
            i = k
            while time.perf_counter() < stop_at:
                data = images[i % len(images)]
                i += 1
                t = time.perf_counter()
                try:
                    r = c.post("/predict", files={"image": ("cell.bmp", data, "application/octet-stream")})
                    ok = r.status_code == 200
                    if not ok:
                        bad.append(f"{r.status_code} {r.text[:120]}")
                except httpx.HTTPError as exc:
                    ok = False
                    bad.append(repr(exc))
                if ok:
                    mine.append(time.perf_counter() - t)
        with lock:
            latencies.extend(mine)
            errors.extend(bad)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return {
        "requests": len(latencies) + len(errors),
        "ok": len(latencies),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:3],
        "elapsed_s": elapsed,
        "throughput": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
    }


def batch_stats(url: str) -> tuple[float, float]:
    """(sum, count) of the adaptive batch size histogram of the model's forward endpoint."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    total = count = 0.0
    for line in text.splitlines():
        if "adaptive_batch_size" in line and "forward" in line:
            if line.startswith("bentoml_service_adaptive_batch_size_sum"):
                total += float(line.split()[-1])
            elif line.startswith("bentoml_service_adaptive_batch_size_count"):
                count += float(line.split()[-1])
    return total, count


def bare_forward_ms(served, size: int, batch: int, seconds: float = 3.0) -> float:
    """Mean forward time per image (ms) of the served model at a batch size, no HTTP, no decoding."""
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    for _ in range(3):
        served.forward(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        served.forward(x)
        n += 1
    return (time.perf_counter() - t0) / (n * batch) * 1000


def preprocess_ms(info, images: list[bytes], seconds: float = 2.0) -> float:
    from pap_severity.serving import UploadLimits, decode_image
    from pap_severity.transforms import eval_transform

    limits, transform = UploadLimits(10**8, 10**9), eval_transform(info.preprocess)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        transform(decode_image(images[n % len(images)], limits))
        n += 1
    return (time.perf_counter() - t0) / n * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tracking-uri", help="MLflow store holding pap-severity@champion (default: train a quick one)")
    ap.add_argument("--images", type=Path, help="folder of cell images to send (default: the quick synthetic set)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--modes", default="on,off", help="comma list of batching modes: on, off")
    ap.add_argument("--max-latency-ms", type=int, default=10_000, help="serve.batch_max_latency_ms for the run")
    ap.add_argument("--batch-max-size", type=int, default=0, help="serve.batch_max_size (default: params.yaml)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (server logs, stores)")
    args = ap.parse_args()

    import torch

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        work = Path(tempfile.mkdtemp(prefix="serve-bench-")) if args.keep else Path(tmp)
        if args.keep:
            print(f"keeping the work folder (logs, stores): {work}")
        tracking = args.tracking_uri or f"sqlite:///{work / 'mlflow.db'}"
        params = write_params(work, tracking, args)
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "BENTOML_HOME": str(work / "bentoml"),
               "PAP_SEVERITY_PARAMS": str(params), "BENTOML_DO_NOT_TRACK": "true",
               "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
        env.pop("PAP_SEVERITY_BENTO_MODEL", None)
        cells = quick_champion(work, params) if not args.tracking_uri else []
        if args.images:
            cells = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".bmp", ".png", ".jpg")
                           and not p.stem.endswith("-d"))[:32]
        if not cells:
            raise SystemExit("no images to send: pass --images with --tracking-uri")
        images = [p.read_bytes() for p in cells]
        tag = import_model(params, env)
        print(f"serving {tag}; {len(images)} distinct images")

        os.environ["BENTOML_HOME"] = env["BENTOML_HOME"]
        import bentoml

        from pap_severity.config import load_config
        from pap_severity.serving import load_served_model

        cfg = load_config(params)
        torch.set_num_threads(cfg.serve.torch_threads)
        served = load_served_model(bentoml.models.get(tag), "cpu")
        size = served.info.preprocess.image_size
        print(f"model {served.info.arch}/{served.info.pipeline} @ {size} px; serve.torch_threads "
              f"{cfg.serve.torch_threads}; batch_max_size {cfg.serve.batch_max_size}; "
              f"batch_max_latency_ms {cfg.serve.batch_max_latency_ms}; {os.cpu_count()} CPUs (shared, busy)")

        rows = []
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            server = Server({**env, "PAP_SEVERITY_BATCHING": "1" if mode == "on" else "0"}, work / f"serve-{mode}.log")
            try:
                load(server.url, images, args.clients, args.warmup)
                s0, c0 = batch_stats(server.url)
                result = load(server.url, images, args.clients, args.duration)
                s1, c1 = batch_stats(server.url)
            finally:
                server.stop()
            bare1 = bare_forward_ms(served, size, 1)
            bareb = bare_forward_ms(served, size, args.clients)
            pre = preprocess_ms(served.info, images)
            per_image = 1000 / result["throughput"] if result["throughput"] else float("nan")
            mean_batch = (s1 - s0) / (c1 - c0) if c1 > c0 else 1.0
            rows.append({"mode": mode, **result, "mean_batch": mean_batch, "serve_ms_per_image": per_image,
                         "bare1_ms": bare1, "bareb_ms": bareb, "pre_ms": pre})
            r = rows[-1]
            if r["errors"]:
                lines = (work / f"serve-{mode}.log").read_text().splitlines()
                hits = [i for i, line in enumerate(lines) if "Traceback" in line or "ERROR" in line]
                if hits:
                    print("server log at the first error:\n" + "\n".join(lines[hits[0]:hits[0] + 40]))
            print(f"\nbatching {mode}: {r['requests']} requests in {r['elapsed_s']:.1f} s, {r['errors']} errors"
                  f"{' ' + str(r['error_examples']) if r['errors'] else ''}")
            print(f"  throughput {r['throughput']:.1f} img/s; latency p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms;"
                  f" mean batch {r['mean_batch']:.2f}")
            print(f"  serving {per_image:.2f} ms/img vs bare forward {bare1:.2f} ms/img (batch 1), {bareb:.2f} "
                  f"ms/img (batch {args.clients}); decode+preprocess {pre:.2f} ms/img")
            print(f"  ratio serving/bare: {per_image / bare1:.2f}x (batch 1), {per_image / bareb:.2f}x "
                  f"(batch {args.clients})")

        print("\nmode  requests errors  img/s   p50_ms   p99_ms  batch  serve_ms/img  bare1_ms  ratio1  "
              f"bare{args.clients}_ms  ratio{args.clients}")
        for r in rows:
            print(f"{r['mode']:<5} {r['requests']:>8} {r['errors']:>6} {r['throughput']:>6.1f} {r['p50_ms']:>8.1f} "
                  f"{r['p99_ms']:>8.1f} {r['mean_batch']:>6.2f} {r['serve_ms_per_image']:>13.2f} {r['bare1_ms']:>9.2f} "
                  f"{r['serve_ms_per_image'] / r['bare1_ms']:>7.2f} {r['bareb_ms']:>10.2f} "
                  f"{r['serve_ms_per_image'] / r['bareb_ms']:>8.2f}")
        if any(r["errors"] for r in rows):
            raise SystemExit("errors under load (must be 0)")


if __name__ == "__main__":
    main()
