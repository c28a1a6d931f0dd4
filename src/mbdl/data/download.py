"""Download, checksum and extract the official archives, atomically.

:func:`fetch` copies a URL (``https://``, ``ftp://`` or ``file://``) to ``<dest>.part``, checks its
MD5 and renames it into place; :func:`extract_archive` checks an archive's MD5, unpacks it into a
temporary folder next to its destination and moves each top-level entry into place with
``os.replace``, so an interrupted download or extraction never leaves a half-written data set.
Without a network every download fails with one :class:`DownloadError` naming the URL and where to
put the file by hand.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

#: seconds to wait for a server before giving up
TIMEOUT_S = 60.0


class DownloadError(OSError):
    """A download or checksum failure, with the URL and what to do by hand."""


def md5sum(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """The hex MD5 digest of a file."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checksum(path: str | Path, md5: str | None) -> None:
    """Raise :class:`DownloadError` unless ``path``'s MD5 is ``md5`` (``None`` skips the check)."""
    if md5 is None:
        return
    actual = md5sum(path)
    if actual != md5.lower():
        raise DownloadError(f"checksum mismatch for {path}: MD5 {actual}, expected {md5}")


def fetch(url: str, dest: str | Path, md5: str | None) -> Path:
    """Download ``url`` to ``dest`` (via ``dest.part``), verify ``md5``, and return ``dest``.

    An existing ``dest`` with the right checksum is reused without downloading.
    """
    dest = Path(dest)
    if dest.is_file():
        try:
            verify_checksum(dest, md5)
            return dest
        except DownloadError:
            pass
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except (urllib.error.URLError, OSError, ValueError) as error:
        partial.unlink(missing_ok=True)
        reason = getattr(error, "reason", error)
        raise DownloadError(
            f"could not download {url}: {reason}; download it by hand and save it as {dest}"
        ) from None
    try:
        verify_checksum(partial, md5)
    except DownloadError:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, dest)
    return dest


def _safe_member(name: str) -> bool:
    path = Path(name)
    return not path.is_absolute() and ".." not in path.parts


def extract_archive(archive: str | Path, dest: str | Path, md5: str | None = None) -> list[Path]:
    """Verify ``archive`` (``.tgz``, ``.tar.gz``, ``.tar`` or ``.zip``) against ``md5`` and unpack
    it into ``dest`` atomically; return the top-level paths created.

    Top-level entries that already exist in ``dest`` are left as they are (an earlier complete
    extraction). Members with absolute paths or ``..`` are refused.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise FileNotFoundError(f"archive not found: {archive}")
    verify_checksum(archive, md5)
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as bundle:
                bad = [n for n in bundle.namelist() if not _safe_member(n)]
                if bad:
                    raise DownloadError(f"refusing to extract {archive}: unsafe member {bad[0]!r}")
                bundle.extractall(staging)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as bundle:
                members = bundle.getmembers()
                bad = [
                    m.name for m in members if not _safe_member(m.name) or m.issym() or m.islnk()
                ]
                if bad:
                    raise DownloadError(f"refusing to extract {archive}: unsafe member {bad[0]!r}")
                if hasattr(tarfile, "data_filter"):
                    bundle.extractall(staging, members=members, filter="data")
                else:  # Python < 3.10.12 / 3.11.4: members checked above
                    bundle.extractall(staging, members=members)
        else:
            raise DownloadError(f"{archive} is not a tar or zip archive")
        created = []
        for entry in sorted(staging.iterdir()):
            target = dest / entry.name
            if target.exists():
                continue
            os.replace(entry, target)
            created.append(target)
        return created
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download_and_extract(
    url: str,
    root: str | os.PathLike[str],
    filename: str,
    md5: str | None,
    *,
    extract: bool = True,
) -> Path:
    """Fetch ``url`` to ``root/filename`` (checksum ``md5``) and, when ``extract``, unpack it into
    ``root``; returns ``root``."""
    root = Path(os.path.expanduser(str(root)))
    archive = fetch(url, root / filename, md5)
    if extract:
        extract_archive(archive, root, md5=None)  # fetch verified it already
    return root
