"""Downloading and unpacking the official Herlev `smear2005.zip`.

The zip is checked (readable, every class folder present, optional sha256) before
anything is unpacked, and it is unpacked next to the target and renamed into place,
so a failed fetch never leaves a half-written data folder behind.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from pap_severity.data.labels import CLASS_FOLDERS
from pap_severity.data.reader import IMAGE_SUFFIXES, MASK_SUFFIX
from pap_severity.progress import progress_bar

ZIP_NAME = "smear2005.zip"
EXTRACTED_NAME = "smear2005"


class FetchError(RuntimeError):
    """The dataset could not be obtained; the message says how to proceed without a download."""


def _offline_hint() -> str:
    return (
        f"If you already have {ZIP_NAME}, run `pap-severity data fetch --zip PATH/{ZIP_NAME}`. "
        "If you have the extracted folder, use it in place: "
        "`dvc exp run -S data.root=PATH`."
    )


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: Path, timeout: float = 60.0, progress: bool = True) -> Path:
    """Stream url to dest with a progress bar; the file appears only when complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, partial.open("wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with progress_bar(progress=progress, total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                while block := resp.read(1 << 16):
                    out.write(block)
                    bar.update(len(block))
            if total is not None and partial.stat().st_size != total:
                raise FetchError(
                    f"download of {url} stopped after {partial.stat().st_size} of {total} bytes. "
                    + _offline_hint()
                )
    except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError) as exc:
        partial.unlink(missing_ok=True)
        reason = f"HTTP {exc.code} {exc.reason}" if isinstance(exc, urllib.error.HTTPError) else (
            getattr(exc, "reason", None) or exc
        )
        raise FetchError(f"could not download {url}: {reason}. " + _offline_hint()) from None
    except FetchError:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(dest)
    return dest


def check_zip(path: Path, sha256: str = "") -> str:
    """Raise FetchError unless path is a sound Herlev zip; returns its sha256."""
    digest = sha256_of(path)
    if sha256 and digest != sha256.lower():
        raise FetchError(
            f"{path}: sha256 is {digest}, but data.sha256 expects {sha256}. "
            "The file is corrupt or not the official release; delete it and fetch again."
        )
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
            names = zf.namelist()
    except zipfile.BadZipFile as exc:
        raise FetchError(f"{path}: not a readable zip ({exc}); delete it and fetch again") from None
    if bad is not None:
        raise FetchError(f"{path}: member {bad} is corrupt (CRC mismatch); delete the zip and fetch again")
    for name in names:
        member = PurePosixPath(name)
        if member.is_absolute() or ".." in member.parts:
            raise FetchError(f"{path}: refuses to extract {name!r}, which points outside the target folder")
    found = {
        part
        for name in names
        if PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES and not name.lower().endswith(MASK_SUFFIX)
        for part in PurePosixPath(name).parts[:-1]
    }
    missing = [c for c in CLASS_FOLDERS if c not in found]
    if missing:
        raise FetchError(f"{path}: no images in class folder(s) {', '.join(missing)}; this is not the Herlev zip")
    return digest


def extract(path: Path, target: Path) -> Path:
    """Unpack into a sibling temp folder, then swap it in for target; the old copy goes last."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-new-", dir=target.parent))
    retired = target.with_name(f".{target.name}-old")
    try:
        with zipfile.ZipFile(path) as zf:
            zf.extractall(staging)
        if retired.exists():
            shutil.rmtree(retired)
        if target.exists():
            target.replace(retired)
        staging.replace(target)
    finally:
        if retired.exists() and not target.exists():
            retired.replace(target)
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)
    return target


def record_in_dvc(archive: Path, url: str, dvc_file: str = "data.dvc") -> Path | None:
    """Record the zip as the DVC import `data.dvc`, so `dvc push`, `dvc pull` and `dvc update` work.

    Returns the .dvc file, or None outside a DVC repository.
    """
    from dvc.exceptions import DvcException, NotDvcRepoError
    from dvc.repo import Repo

    try:
        root = Path(Repo.find_root(str(archive.parent)))
    except NotDvcRepoError:
        return None
    try:
        out = archive.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return None
    record = root / dvc_file
    previous = record.read_text() if record.exists() else None
    record.write_text(
        "# The official Herlev zip, imported from its URL: `dvc update data.dvc` downloads it again,\n"
        "# `dvc pull` restores it from the remote. Written by `pap-severity data fetch`.\n"
        f"frozen: true\ndeps:\n- path: {url}\nouts:\n- path: {out}\n"
    )
    try:
        with Repo(str(root)) as repo:
            repo.commit(str(record), force=True)
    except DvcException as exc:
        if previous is None:
            record.unlink()
        else:
            record.write_text(previous)
        print(f"warning: the data is in place, but DVC could not record it in {dvc_file} ({exc})")
        return None
    return record


def fetch(url: str, dest_dir: str | Path, sha256: str = "", zip_path: str | Path | None = None,
          progress: bool = True) -> Path:
    """Obtain smear2005.zip (download, or a copy on disk), check it, extract it, record it in DVC.

    The zip is checked before anything stored is replaced. Returns `dest_dir/smear2005`.
    """
    dest_dir = Path(dest_dir)
    archive = dest_dir / ZIP_NAME
    downloaded = False
    if zip_path is not None:
        source = Path(zip_path)
        if not source.is_file():
            raise FetchError(f"{source}: no such file; give the path of {ZIP_NAME}")
    elif archive.is_file():
        source = archive
    else:
        source, downloaded = download(url, archive, progress=progress), True
    try:
        digest = check_zip(source, sha256)
    except FetchError:
        if downloaded:
            archive.unlink(missing_ok=True)
        raise
    if not sha256:
        print(f"{source}: sha256 {digest} (set data.sha256 in params.yaml to pin it)")
    if source.resolve() != archive.resolve():
        partial = archive.with_name(archive.name + ".part")
        dest_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, partial)
        partial.replace(archive)
    root = extract(archive, dest_dir / EXTRACTED_NAME)
    if record_in_dvc(archive, url):
        print(f"recorded {archive} in data.dvc; `dvc push` stores it on your DVC remote")
    return root
