"""What the command line says besides results: its version, its log lines, its progress bars, its errors.

The commands run as real processes (`python -m pap_severity`), so logging, terminals and the
environment are those a user has.
"""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import tomllib
from pathlib import Path

import pytest

from pap_severity import __version__
from pap_severity.cli import in_project, library_error

ROOT = Path(__file__).resolve().parents[1]


def env_without(*names: str, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update(extra)
    return env


def cli(*args, cwd: Path | None = None, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pap_severity", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env=env if env is not None else env_without("DVC_ROOT", "TQDM_DISABLE"),
                          timeout=timeout)


def on_a_terminal(*args, cwd: Path, env: dict) -> str:
    """stderr of the command when it is a terminal (a pseudo-terminal), as the user sees it."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 rows, 120 columns
    proc = subprocess.Popen([sys.executable, "-m", "pap_severity", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the other side closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    proc.wait(timeout=300)
    os.close(master)
    assert proc.returncode == 0
    return b"".join(chunks).decode(errors="replace")


def test_version_is_the_packages_and_pyprojects():
    done = cli("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"pap-severity {__version__}"
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == __version__


def test_verbose_shows_debug_lines_quiet_hides_info(tmp_path):
    """`_config` says where the settings come from (debug) and, in a DVC temporary copy, where MLflow logs (info)."""
    env = env_without("MLFLOW_TRACKING_URI", "TQDM_DISABLE", DVC_ROOT=str(tmp_path / "project"))
    args = ("data", "split", tmp_path / "no-manifest.csv", "--out", tmp_path / "splits.csv")
    plain, verbose, quiet = (cli(*flags, *args, cwd=tmp_path, env=env) for flags in ((), ("-v",), ("-q",)))
    store = f"MLflow store: sqlite:///{(tmp_path / 'project').resolve().as_posix()}/mlflow.db"
    for done in (plain, verbose, quiet):
        assert done.returncode == 2 and "error:" in done.stderr and "no manifest" in done.stderr
    assert "Traceback" not in plain.stderr and "Traceback" not in quiet.stderr
    assert f"INFO pap_severity.cli: {store}" in plain.stderr and "DEBUG" not in plain.stderr
    assert "DEBUG pap_severity.cli: settings: the built-in defaults" in verbose.stderr and store in verbose.stderr
    assert "Traceback" not in verbose.stderr.split("the error in full:")[0]  # the traceback follows, marked
    assert "the error in full:" in verbose.stderr and "Traceback" in verbose.stderr
    assert "INFO" not in quiet.stderr and "DEBUG" not in quiet.stderr
    both = cli("-q", "-v", *args, cwd=tmp_path, env=env)
    assert both.returncode == 2 and both.stderr.strip() == "error: -q and -v contradict each other; give one"


def test_progress_bars_follow_the_terminal_and_tqdm_disable(tmp_path):
    args = ("data", "synth", "--out", tmp_path / "synth", "--per-class", 2, "--size", 24)
    env = env_without("TQDM_DISABLE", "DVC_ROOT")
    piped = cli(*args, cwd=tmp_path, env=env)
    assert piped.returncode == 0 and "synth cells" not in piped.stderr  # a log file gets no bar
    assert "synth cells" in on_a_terminal(*args, cwd=tmp_path, env=env)
    assert "synth cells" not in on_a_terminal(*args, cwd=tmp_path, env={**env, "TQDM_DISABLE": "1"})
    assert "synth cells" not in on_a_terminal("-q", *args, cwd=tmp_path, env=env)


@pytest.fixture
def project(tmp_path, synth_set) -> Path:
    """A working directory with data/manifest.csv and data/splits.csv (the synth_set cells)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.csv").write_text(synth_set["manifest_csv"].read_text())
    (tmp_path / "data" / "splits.csv").write_text(synth_set["splits_csv"].read_text())
    return tmp_path


def test_an_unreachable_tracking_server_is_one_line(project):
    env = env_without("DVC_ROOT", MLFLOW_TRACKING_URI="http://127.0.0.1:9", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    done = cli("train", "-p", "classification", cwd=project, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1] == ("error: MLflow (http://127.0.0.1:9): cannot reach the tracking server: Connection refused; "
                         "check the MLflow store (MLFLOW_TRACKING_URI, else mlflow.tracking_uri in params.yaml)")
    assert "Traceback" not in done.stderr


def test_a_broken_mlflow_database_is_one_line(project):
    (project / "mlflow.db").write_text("not a database " * 20)
    env = env_without("DVC_ROOT", MLFLOW_TRACKING_URI="sqlite:///mlflow.db")
    done = cli("train", "-p", "classification", cwd=project, env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "error: database: (sqlite3.DatabaseError) file is not a database; "
        "check the database URL and that its server runs")


def test_dvc_and_other_library_errors_read_as_one_line():
    import sqlalchemy.exc
    from dvc.exceptions import NotDvcRepoError
    from mlflow.exceptions import MlflowException

    dvc = library_error(NotDvcRepoError("you are not inside of a DVC repository"))
    assert dvc.startswith("DVC: you are not inside of a DVC repository; ") and "\n" not in dvc
    db = library_error(sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("could not connect\nto server")))
    assert db.startswith("database: (builtins.Exception) could not connect;") and "\n" not in db
    mlflow = library_error(MlflowException("RESOURCE_DOES_NOT_EXIST: no model\nmore detail " + "x" * 500))
    assert mlflow.startswith("MLflow") and "RESOURCE_DOES_NOT_EXIST: no model;" in mlflow and "\n" not in mlflow
    assert library_error(ValueError("ours")) is None


@pytest.mark.parametrize("args", [("register", "-p", "foo"), ("train", "-p", "foo"), ("explain", "--pipeline", "foo")])
def test_an_unknown_pipeline_is_named_before_anything_runs(tmp_path, args):
    done = cli(*args, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == ("error: unknown pipeline 'foo'; choose from classification, regression, combined, "
                                   "corn, sord")


def test_a_relative_mlflow_store_is_made_the_projects():
    root = Path("/projects/pap")
    assert in_project("sqlite:///mlflow.db", root) == "sqlite:////projects/pap/mlflow.db"
    assert in_project("sqlite:///sub/m.db?timeout=5", root) == "sqlite:////projects/pap/sub/m.db?timeout=5"
    assert in_project("mlruns", root) == "/projects/pap/mlruns"
    for unchanged in ("sqlite:////abs/mlflow.db", "sqlite:///:memory:", "http://127.0.0.1:5000",
                      "postgresql://u@db/mlflow", "/abs/mlruns", "file:///abs/mlruns"):
        assert in_project(unchanged, root) == unchanged


def test_a_command_runs_each_pipeline_with_its_own_tuned_settings():
    from pap_severity.cli import each_pipeline
    from pap_severity.config import Config

    cfg = Config()
    assert each_pipeline(cfg, None) == [(name, None) for name in cfg.train.pipelines]
    template = Path("tuning/{pipeline}/best_params.json")
    assert each_pipeline(cfg, ["sord", "corn", "sord"], template) == [
        ("sord", Path("tuning/sord/best_params.json")), ("corn", Path("tuning/corn/best_params.json"))]
    assert each_pipeline(cfg, ["corn"], Path("best.json")) == [("corn", Path("best.json"))]
    with pytest.raises(ValueError, match=r"--best-params best.json is one file for 5 pipelines; put \{pipeline\}"):
        each_pipeline(cfg, None, Path("best.json"))


@pytest.mark.parametrize("args", [("train", "--best-params", "best.json"),
                                  ("tune", "-p", "corn", "-p", "sord", "--study-name", "mine")])
def test_one_file_or_study_for_several_pipelines_is_refused_before_anything_runs(tmp_path, args):
    done = cli(*args, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: --") and "give one --pipeline" in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_sweep_reads_the_combined_pipelines_tuned_settings_from_a_template(tmp_path):
    """`sweep` cross-validates combined only: {pipeline} in --best-params stands for combined."""
    done = cli("sweep", "--best-params", "tuning/{pipeline}/best_params.json", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "tuning/combined/best_params.json" in done.stderr and "{pipeline}" not in done.stderr, done.stderr
