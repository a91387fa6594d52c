"""An in-memory stand-in for Google Cloud Storage behind ``etils.epath`` (no network, no gcsfs).

``install(monkeypatch)`` routes every ``gs://`` path that epath opens, lists or renames to a
fresh in-memory filesystem with GCS's shape (paths are ``bucket/key``, directories are
implied by keys) and returns it; monkeypatch undoes it after the test. Only this process
sees it: grain worker processes do not.
"""

import os

import fsspec
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem


class FakeGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    root_marker = ""
    store: dict = {}
    pseudo_dirs: list = [""]
    cachable = False  # a fresh instance (and store) per install()

    @classmethod
    def _strip_protocol(cls, path):
        path = fsspec.utils.stringify_path(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                path = path[len(prefix) :]
        return path.rstrip("/")

    def upload(self, local_path: str, remote: str) -> None:
        """Copies a local file to ``gs://`` ``remote``."""
        self.makedirs(os.path.dirname(self._strip_protocol(remote)), exist_ok=True)
        with open(local_path, "rb") as src, self.open(remote, "wb") as dst:
            dst.write(src.read())


def install(monkeypatch) -> FakeGCS:
    fs = FakeGCS()
    fs.store, fs.pseudo_dirs = {}, [""]  # per instance, not the class's
    monkeypatch.setattr(
        type(epath_backend.fsspec_backend), "_get_filesystem", lambda self, name: fs
    )
    return fs
