"""Small file helpers shared by the package: atomic writes and content hashes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

_HASH_CHUNK = 1 << 20


def _current_umask() -> int:
    # os.umask can only be read by setting it; restored at once (not thread-safe, like the call).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_default_modes(path: str | os.PathLike) -> None:
    """Give a file or folder tree the modes ``open``/``mkdir`` would, under the current umask.

    ``tempfile`` makes 0600 files and 0700 folders (and safetensors writes 0600 files), so an
    atomically written result (a checkpoint, a JSON table) would otherwise be readable by its
    owner only, e.g. not by the other users of a shared cluster.
    """
    path = Path(path)
    mask = _current_umask()
    for item in [path, *(path.rglob("*") if path.is_dir() else ())]:
        if not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` (same suffix); rename it onto ``path`` on success.

    The temporary file lives in the destination folder, so the final ``os.replace`` is atomic
    and a crash never leaves a half-written file under the real name. On error it is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if path.exists():
            shutil.copymode(path, tmp)  # a rewritten file keeps its mode
        else:
            give_default_modes(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def path_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, or of a folder's files (names and contents, sorted)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for child in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(child.relative_to(path)).encode())
        digest.update(file_sha256(child).encode())
    return digest.hexdigest()
