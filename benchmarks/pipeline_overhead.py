"""How much of `dvc repro` is the network's compute, and how much is machinery?

One `dvc repro` of the embedded default (params.yaml as committed) in a fresh clone of this
repository (its HEAD; commit first) in a temporary folder. Every training epoch and prediction
pass appends the seconds it spent in forward, backward and optimizer steps to a file
(`devices.COMPUTE_LOG_ENV`); the DVC output is read as it comes, so each line of that file
falls in the stage running when it was written. Printed per stage, and for the whole run:

- wall: from DVC starting the stage to it starting the next one (DVC's hashing and caching
  of the stage's outs included);
- compute: the seconds spent in the network (devices.ComputeClock): forward + backward +
  optimizer step of training, the forward passes of validation and prediction, the fold
  ensemble's (TTA) passes, and Integrated Gradients' forward and backward passes (explain);
- machinery: 1 - compute / wall (imports, process start, data loading, MLflow, DVC, ...).

Then the disk the run wrote (du counts a hard-linked file once): models/, the DVC cache, the
MLflow store and its artifacts, the BentoML store.

With --exp KEY=VALUE, then one `dvc exp run -S KEY=VALUE` on top, and the disk that second
run wrote against the size of the model files it retrained (new files under models/).

    python benchmarks/pipeline_overhead.py [--keep] [--set train.epochs=2 ...] [--exp loss.sord_scale=2]

--set overrides params.yaml keys in the clone (dotted key=YAML value); --keep leaves the clone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from pap_severity.devices import COMPUTE_LOG_ENV

ROOT = Path(__file__).resolve().parents[1]
STAGE = re.compile(r"^Running stage '([^']+)'")
STORES = ("models", ".dvc/cache", "mlruns", "mlartifacts", "mlflow.db", "bentoml_home")


def clone(dest: Path, overrides: list[str]) -> None:
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True)
    if overrides:
        params = yaml.safe_load((dest / "params.yaml").read_text())
        for item in overrides:
            key, _, value = item.partition("=")
            *path, last = key.split(".")
            section = params
            for part in path:
                section = section[part]
            section[last] = yaml.safe_load(value)
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def repro(project: Path, compute_log: Path) -> tuple[list[tuple[str, float, int]], float, int]:
    """Runs `dvc repro`; returns (stage, start time, compute lines written before it), its end, its exit code."""
    env = {**os.environ, COMPUTE_LOG_ENV: str(compute_log), "TQDM_DISABLE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PYTHONPATH", None)  # the clone's code, as installed (editable) or on the path below
    env["PYTHONPATH"] = str(project / "src")
    marks = []
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=project, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in proc.stdout:
        match = STAGE.match(line)
        if match:
            marks.append((match.group(1), time.perf_counter(), _lines(compute_log)))
            print(f"[{time.strftime('%H:%M:%S')}] {match.group(1)}", flush=True)
        elif line.startswith(("ERROR", "error:")):
            print(line, end="", flush=True)
    code = proc.wait()
    return marks, time.perf_counter(), code


def _seconds(record: dict) -> float:
    """A compute line's seconds in the network, whatever its kinds."""
    return sum(v for k, v in record.items() if k not in ("pid", "what"))


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def du(project: Path) -> dict[str, int]:
    """Bytes per store, hard links counted once over all of them (one du call), and the total."""
    present = [name for name in STORES if (project / name).exists()]
    if not present:
        return {}
    done = subprocess.run(["du", "-sbc", *present], cwd=project, capture_output=True, text=True, check=True)
    sizes = {}
    for line in done.stdout.splitlines():
        size, name = line.split("\t", 1)
        sizes[name] = int(size)
    return sizes


def _model_files(project: Path) -> dict[Path, int]:
    """(device, inode) of every file under models/ -> its size: a retrained model is a new inode."""
    return {(f.stat().st_dev, f.stat().st_ino): f.stat().st_size for f in (project / "models").rglob("*") if f.is_file()}


def second_run(project: Path, setting: str) -> None:
    """`dvc exp run -S setting` after the first run: its wall time, the disk it added, and the size of
    the model files it wrote (the issue's bound on what a second experiment may add)."""
    before, models_before = du(project).get("total", 0), _model_files(project)
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(project / "src"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "-S", setting], cwd=project, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        print(done.stdout[-2000:], done.stderr[-2000:], file=sys.stderr)
        sys.exit(done.returncode)
    stages = [m.group(1) for m in map(STAGE.match, done.stdout.splitlines()) if m]
    new = {k: v for k, v in _model_files(project).items() if k not in models_before}
    added = du(project).get("total", 0) - before
    print(f"\ndvc exp run -S {setting}: {wall:.1f} s, {len(stages)} stages ({', '.join(stages)})")
    print(f"  disk added {added / 1e6:.1f} MB; model files it wrote {sum(new.values()) / 1e6:.1f} MB "
          f"({len(new)} files); ratio {added / max(sum(new.values()), 1):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="leave the temporary clone")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params.yaml override")
    parser.add_argument("--exp", metavar="KEY=VALUE", help="then `dvc exp run -S KEY=VALUE`, and what it wrote")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="pipeline_overhead-"))
    project, compute_log = tmp / "project", tmp / "compute.jsonl"
    try:
        clone(project, args.set)
        start = time.perf_counter()
        marks, end, code = repro(project, compute_log)
        records = [json.loads(line) for line in compute_log.read_text().splitlines()] if compute_log.is_file() else []
        rows = []
        for i, (stage, began, first) in enumerate(marks):
            stop, last = (marks[i + 1][1], marks[i + 1][2]) if i + 1 < len(marks) else (end, len(records))
            compute = sum(_seconds(r) for r in records[first:last])
            rows.append((stage, stop - began, compute))
        print(f"\n{'stage':34} {'wall s':>8} {'compute s':>10} {'machinery':>10}")
        for stage, wall, compute in rows:
            print(f"{stage:34} {wall:8.1f} {compute:10.1f} {1 - compute / wall:10.0%}")
        wall = end - start
        compute = sum(_seconds(r) for r in records)
        print(f"{'dvc repro (whole run)':34} {wall:8.1f} {compute:10.1f} {1 - compute / wall:10.0%}")
        parts = {k: sum(r.get(k, 0.0) for r in records) for k in ("forward", "backward", "step", "attribution")}
        print("compute: " + ", ".join(f"{k} {v:.1f} s" for k, v in parts.items()))
        print("\ndisk written (du -sbc, hard links once):")
        for name, size in du(project).items():
            print(f"  {name:14} {size / 1e6:9.1f} MB")
        if code != 0:
            print(f"dvc repro failed (exit {code}); the figures cover the stages it ran", file=sys.stderr)
            sys.exit(code)
        if args.exp:
            second_run(project, args.exp)
    finally:
        if args.keep:
            print(f"clone kept at {project}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
