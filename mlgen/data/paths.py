"""Local and remote paths for the data pipelines: globs, files, atomic writes.

Remote paths (``gs://bucket/...``, also ``s3://``, ``az://``, ``hf://``) go through
``etils.epath``, which hands them to the filesystem unmangled (``pathlib.Path`` would
collapse ``gs://`` to ``gs:/``; ``open`` and ``os.path`` do not know them). Local paths keep
the standard library's semantics exactly (``glob.glob`` with ``**``, ``~`` expanded, hidden
files skipped by ``*``), because the strings it returns are document ids, and the ids
decide the train/validation split.
"""

from __future__ import annotations

import glob as _glob
import os
import uuid
from collections.abc import Sequence

from etils import epath

REMOTE_PREFIXES = ("gs://", "s3://", "az://", "hf://")


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an object store (``gs://...``) rather than a local file."""
    return os.fspath(path).startswith(REMOTE_PREFIXES)


def expand_globs(patterns: Sequence[str]) -> list[str]:
    """Sorted, de-duplicated files matching any of ``patterns``.

    Local patterns may use ``**`` (recursive) and ``~``; remote ones (``gs://b/d/*.txt``)
    may use ``*``, ``?`` and ``[...]`` in any component but not ``**`` (one listing per
    directory on an object store).

    Args:
      patterns: globs or plain paths, local or remote.

    Returns:
      The matching files (directories are left out), as the strings that name them.

    Raises:
      ValueError: a remote pattern uses ``**``.
    """
    out: set[str] = set()
    for pat in patterns:
        if is_remote(pat):
            out.update(_remote_glob(pat))
        else:
            hits = _glob.glob(os.path.expanduser(pat), recursive=True)
            out.update(h for h in hits if os.path.isfile(h))
    return sorted(out)


def _remote_glob(pattern: str) -> list[str]:
    if "**" in pattern:
        raise ValueError(
            f"{pattern!r}: '**' is not supported for remote paths (use '*' per directory)"
        )
    if not _glob.has_magic(pattern):
        return [pattern] if epath.Path(pattern).is_file() else []
    scheme, rest = pattern.split("://", 1)
    bucket, _, sub = rest.partition("/")
    hits = epath.Path(f"{scheme}://{bucket}").glob(sub)
    return [str(h) for h in hits if h.is_file()]


def read_bytes(path: str) -> bytes:
    """The content of a local or remote file."""
    return epath.Path(path).read_bytes()


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` (local or remote) so that readers never see half a file.

    The bytes go to a temporary file beside ``path`` that is then renamed over it (on an
    object store an upload only appears once complete, so the rename is a plain copy).
    Parent directories are created.
    """
    dst = epath.Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    # Unique per writer, so that two writers never share (and truncate) one temp file.
    tmp = epath.Path(f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(data)
    tmp.replace(dst)


def unwritable(path: str | os.PathLike, *, kind: str = "directory") -> str | None:
    """Why the local ``path`` (a ``kind``: ``"directory"`` or ``"file"``) cannot be written or
    created here, in a few words (None if it can; remote paths are not checked). Nothing is
    created: a missing path is judged by its nearest existing ancestor."""
    if is_remote(path):
        return None
    target = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.exists(target):
        if kind == "directory" and not os.path.isdir(target):
            return "is a file, not a directory"
        if kind == "file" and os.path.isdir(target):
            return "is a directory"
        folder = target if kind == "directory" else os.path.dirname(target)
        if not os.access(folder, os.W_OK | os.X_OK):
            return "is not writable" if folder == target else f"is in {folder!r}, not writable"
        return None
    ancestor = os.path.dirname(target)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        return f"cannot be created: {ancestor!r} is a file"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"cannot be created: {ancestor!r} is not writable"
    return None
