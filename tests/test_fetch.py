"""`data fetch` against a real HTTP server on loopback (there is no internet here)."""

import functools
import http.server
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from pap_severity.data.fetch import FetchError, check_zip, fetch
from pap_severity.data.reader import find_cells


def make_zip(root: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w") as zf:
        for f in sorted(root.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(root.parent).as_posix())
    return out


@pytest.fixture
def served(tmp_path):
    """A folder served over HTTP on a free loopback port; yields (folder, base_url)."""
    folder = tmp_path / "www"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_check_and_extract(tiny_herlev, served, tmp_path):
    www, base = served
    make_zip(tiny_herlev, www / "smear2005.zip")
    root = fetch(f"{base}/smear2005.zip", tmp_path / "raw", progress=False)
    assert root == tmp_path / "raw" / "smear2005"
    assert len(find_cells(root)) == 56
    assert not list((tmp_path / "raw").glob("*.part"))


def test_pinned_sha256_is_checked(tiny_herlev, served, tmp_path):
    www, base = served
    make_zip(tiny_herlev, www / "smear2005.zip")
    with pytest.raises(FetchError, match="sha256 is .* but data.sha256 expects"):
        fetch(f"{base}/smear2005.zip", tmp_path / "raw", sha256="0" * 64, progress=False)
    assert not (tmp_path / "raw" / "smear2005").exists()
    assert not (tmp_path / "raw" / "smear2005.zip").exists(), "a rejected download is not kept"


def test_failed_download_says_what_failed_and_how_to_go_on(served, tmp_path):
    _, base = served
    with pytest.raises(FetchError) as err:
        fetch(f"{base}/missing.zip", tmp_path / "raw", progress=False)
    message = str(err.value)
    assert f"could not download {base}/missing.zip" in message and "HTTP 404" in message
    assert "--zip" in message and "data.root=" in message
    assert not list((tmp_path / "raw").glob("*")), "no partial file is left behind"


def test_unreachable_host(tmp_path):
    with pytest.raises(FetchError, match="could not download http://127.0.0.1:9/"):
        fetch("http://127.0.0.1:9/smear2005.zip", tmp_path / "raw", progress=False)


def test_a_zip_on_disk_is_used_without_network(tiny_herlev, tmp_path):
    local = make_zip(tiny_herlev, tmp_path / "mine.zip")
    root = fetch("http://127.0.0.1:9/never-contacted.zip", tmp_path / "raw", zip_path=local, progress=False)
    assert len(find_cells(root)) == 56


def test_a_bad_zip_leaves_the_existing_data_alone(tiny_herlev, tmp_path):
    good = fetch("http://127.0.0.1:9/x", tmp_path / "raw", zip_path=make_zip(tiny_herlev, tmp_path / "a.zip"),
                 progress=False)
    before = sorted(p.name for p in good.rglob("*"))
    broken = tmp_path / "broken.zip"
    data = (tmp_path / "raw" / "smear2005.zip").read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(FetchError, match="not a readable zip"):
        fetch("http://127.0.0.1:9/x", tmp_path / "raw", zip_path=broken, progress=False)
    assert sorted(p.name for p in good.rglob("*")) == before
    check_zip(tmp_path / "raw" / "smear2005.zip")


def test_a_zip_without_the_class_folders_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("photos/cat.jpg", b"meow")
    with pytest.raises(FetchError, match="no images in class folder.*not the Herlev zip"):
        check_zip(tmp_path / "other.zip")


def test_a_zip_escaping_its_folder_is_refused(tiny_herlev, tmp_path):
    z = make_zip(tiny_herlev, tmp_path / "evil.zip")
    with zipfile.ZipFile(z, "a") as zf:
        zf.writestr("../../escape.txt", b"x")
    with pytest.raises(FetchError, match="outside the target folder"):
        check_zip(z)


@pytest.mark.slow
def test_fetch_records_the_zip_as_a_dvc_import(tiny_herlev, served, tmp_path, monkeypatch):
    """In a DVC repo, fetch writes data.dvc so that `dvc checkout`/`pull` and `dvc update` work."""
    www, base = served
    make_zip(tiny_herlev, www / "smear2005.zip")
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.chdir(repo)
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], check=True)
    fetch(f"{base}/smear2005.zip", repo / "data" / "raw", progress=False)
    record = (repo / "data.dvc").read_text()
    assert f"path: {base}/smear2005.zip" in record and "path: data/raw/smear2005.zip" in record
    assert "md5:" in record
    (repo / "data" / "raw" / "smear2005.zip").unlink()
    subprocess.run([sys.executable, "-m", "dvc", "checkout", "data.dvc"], check=True, capture_output=True)
    check_zip(repo / "data" / "raw" / "smear2005.zip")
    done = subprocess.run([sys.executable, "-m", "dvc", "update", "data.dvc"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
