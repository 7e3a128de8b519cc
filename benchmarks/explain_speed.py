"""How fast is batched Integrated Gradients, against the cost of the passes it must make?

IG over one image with n_steps interpolation points costs about one forward plus one
backward pass over n_steps (+1 for the delta) inputs. The floor printed here is one
forward + backward (gradients w.r.t. the input, as IG needs) over a batch of
n_steps + 1 images; the target is batched IG per image within 1.5x of it.

Each pass figure is the mean over a block of as many passes as IG has images, so that
floor and IG run for about as long and see the same load from other processes; the
blocks are interleaved, and each figure is the best block of --repeats.

Model: resnet18 with the combined head at --size px (default 64), loaded from
models/combined/*.pt when one of that size is there, else untrained (the weights do not
change the timing).

    python benchmarks/explain_speed.py [--images 32] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import glob
import time
import warnings
from contextlib import contextmanager

import torch

from pap_severity.checkpoints import ModelBundle, load_bundle
from pap_severity.config import ExplainConfig
from pap_severity.explain import ConvergenceWarning, integrated_gradients
from pap_severity.models import build_model
from pap_severity.pipelines import get_pipeline
from pap_severity.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocess

TARGET_RATIO = 1.5


def load_model(size: int) -> tuple[ModelBundle, str]:
    for path in sorted(glob.glob("models/combined/*.pt")):
        try:
            bundle, _ = load_bundle(path)
        except (ValueError, KeyError, RuntimeError):
            continue
        if bundle.preprocess.image_size == size and bundle.arch == "resnet18":
            return bundle, path
    torch.manual_seed(0)
    pipeline = get_pipeline("combined")
    model = build_model("resnet18", "none", pipeline.head).eval()
    return ModelBundle(model, pipeline, "resnet18", Preprocess(size, IMAGENET_MEAN, IMAGENET_STD)), "untrained"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@contextmanager
def input_gradients_only(model: torch.nn.Module, params: bool):
    flags = [p.requires_grad for p in model.parameters()]
    for p, f in zip(model.parameters(), flags):
        p.requires_grad_(params and f)
    try:
        yield
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


def forward_backward(model: torch.nn.Module, x: torch.Tensor, params: bool) -> None:
    """One forward + backward over x: to the input only (as IG), or to the parameters too."""
    with input_gradients_only(model, params):
        xi = x.clone().requires_grad_(True)
        out = model(xi)[:, -1].sum()
        torch.autograd.grad(out, [xi] + ([p for p in model.parameters() if p.requires_grad] if params else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--n-steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[51, 102, 204])
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    bundle, source = load_model(args.size)
    model = bundle.model.eval()
    n, steps = args.images, args.n_steps
    images = torch.randn(n, 3, args.size, args.size)
    floor_batch = torch.randn(steps + 1, 3, args.size, args.size)
    print(f"model: resnet18 {args.size} px ({source}); torch {torch.__version__}, {args.threads} threads, "
          f"{n} images, n_steps={steps}; each figure the best of {args.repeats} interleaved blocks")

    cfgs = {ibs: ExplainConfig(n_steps=steps, internal_batch_size=ibs) for ibs in args.batch_sizes}
    def passes(fn):  # as many passes as IG has images: both blocks last about as long
        return lambda: [fn() for _ in range(n)]

    jobs = {
        "forward": passes(lambda: torch.no_grad()(model)(floor_batch)),
        "floor": passes(lambda: forward_backward(model, floor_batch, params=False)),
        "floor_params": passes(lambda: forward_backward(model, floor_batch, params=True)),
        **{ibs: (lambda cfg=cfg: integrated_gradients(bundle, images, cfg)) for ibs, cfg in cfgs.items()},
    }
    best = {k: float("inf") for k in jobs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # an untrained model on noise
        for job in jobs.values():  # warm-up
            job()
        for _ in range(args.repeats):  # interleaved, so drifting load hits every figure alike
            for key, job in jobs.items():
                best[key] = min(best[key], timed(job))

    best["forward"], best["floor"], best["floor_params"] = (best[k] / n for k in ("forward", "floor", "floor_params"))
    floor = best["floor"]
    print(f"forward only, batch {steps + 1}:                            {best['forward'] * 1e3:8.1f} ms")
    print(f"forward + backward to the input, batch {steps + 1}:         {floor * 1e3:8.1f} ms  <- floor")
    print(f"forward + backward to input and weights, batch {steps + 1}: {best['floor_params'] * 1e3:8.1f} ms")
    results = []
    for ibs in args.batch_sizes:
        per_image = best[ibs] / n
        results.append((ibs, per_image))
        print(f"batched IG ({n} images), internal_batch_size={ibs:4d}: {per_image * 1e3:8.1f} ms / image, "
              f"{per_image / floor:5.2f} x the floor")
    best_ibs, per_image = min(results, key=lambda r: r[1])
    ratio = per_image / floor
    verdict = "OK" if ratio <= TARGET_RATIO else "ABOVE TARGET"
    print(f"best: internal_batch_size={best_ibs}: {per_image * 1e3:.1f} ms / image = {ratio:.2f} x the floor "
          f"(target <= {TARGET_RATIO}): {verdict}")


if __name__ == "__main__":
    main()
