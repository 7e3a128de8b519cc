"""Training throughput against this machine's matmul rate, measured side by side in one run.

Prints training images per second, the achieved GFLOP/s of a training step (FLOPs counted by
torch.utils.flop_counter over forward + backward), this machine's matmul GFLOP/s in the same
precision, and their ratio. Target: at least 40% of the matmul rate for resnet18 at 128 px on CPU.
Each architecture and precision is measured as training runs it: bf16 is autocast (train.amp), and
the memory format is channels_last where devices.channels_last_pays says so.

    python benchmarks/train_throughput.py                       # resnet18, 128 px, CPU, fp32
    python benchmarks/train_throughput.py --arch resnet18 resnet18_w16 --image-size 48 # the default's
    python benchmarks/train_throughput.py --arch resnet18_w16 --image-size 48 --precision fp32 bf16
    python benchmarks/train_throughput.py --device cuda --precision bf16   # on a GPU
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from pap_severity import losses
from pap_severity.devices import channels_last_pays, cpu_has_bf16
from pap_severity.models import ClassifierHead, build_model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(device: torch.device, n: int, repeats: int, dtype: torch.dtype) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def channels_last(device: torch.device, amp: bool, args: argparse.Namespace) -> bool:
    """As training decides it (devices.channels_last_pays), unless --no-channels-last."""
    return channels_last_pays(device, amp) and not args.no_channels_last


def measure(arch: str, amp: bool, args: argparse.Namespace, device: torch.device) -> tuple[float, float]:
    """Training steps of `arch` on random cells, bf16 autocast or not: (images per second, FLOPs per step)."""
    torch.manual_seed(0)
    model = build_model(arch, "none", ClassifierHead).to(device).train()
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    if channels_last(device, amp, args):
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (args.batch_size,), device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        losses.combined(out[:, :5].float(), y).backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    flops_per_step = counter.get_total_flops()
    for _ in range(2):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    return args.batch_size * args.steps / (time.perf_counter() - start), flops_per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["resnet18"],
                        help="one or more (e.g. resnet18 resnet18_w16): measured one after the other, "
                             "speeds printed against the first")
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32"],
                        help="one or both: bf16 is autocast, as train.amp trains; speeds printed against the first")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-channels-last", action="store_true", help="never channels_last")
    parser.add_argument("--matmul-size", type=int, default=2048)
    args = parser.parse_args()

    device = torch.device(args.device)
    runs = [(arch, precision) for arch in args.arch for precision in args.precision]
    results = {run: measure(run[0], run[1] == "bf16", args, device) for run in runs}
    peaks = {}
    for precision in args.precision:
        amp = precision == "bf16"
        tf32 = device.type == "cuda" and not amp and torch.backends.cudnn.allow_tf32
        if tf32:  # cuDNN convolutions run fp32 as TF32 by default: compare with TF32 matmul
            torch.backends.cuda.matmul.allow_tf32 = True
        peaks[precision] = ("tf32" if tf32 else precision, matmul_gflops(
            device, args.matmul_size, repeats=10 if device.type == "cpu" else 50,
            dtype=torch.bfloat16 if amp else torch.float32))
    native = f", native bf16: {'yes' if cpu_has_bf16() else 'no (emulated)'}" if device.type == "cpu" else ""
    print(f"setting: {args.image_size} px, batch {args.batch_size}, {device.type}{native}, "
          f"torch threads {torch.get_num_threads()}; matmul ({args.matmul_size}^2): "
          + ", ".join(f"{kind} {peak:.1f} GFLOP/s" for kind, peak in peaks.values()))
    first = next(iter(results.values()))[0]
    for (arch, precision), (rate, flops_per_step) in results.items():
        achieved = flops_per_step * rate / args.batch_size / 1e9
        kind, peak = peaks[precision]
        layout = "channels_last" if channels_last(device, precision == "bf16", args) else "contiguous"
        print(f"{arch} {precision} ({layout}): {rate:.1f} images/s ({rate / first:.2f}x {runs[0][0]} "
              f"{runs[0][1]}), {flops_per_step / args.batch_size / 1e9:.3f} GFLOP per image (forward + "
              f"backward), achieved {achieved:.1f} GFLOP/s = {achieved / peak:.1%} of {kind} matmul")
    print("target: >= 40% of matmul for resnet18 at 128 px on CPU")


if __name__ == "__main__":
    main()
