"""TensorBoard scalar event files, written without TensorFlow, PyTorch or tensorboardX.

Supports:
- :class:`EventWriter`: ``scalar(tag, value, step)``, ``flush()``, ``close()`` into
  ``LOGDIR/events.out.tfevents.<time>.<host>.<pid>.mlgen``, local or remote (any
  ``etils.epath`` path: a remote file is rewritten whole on each flush, as ``metrics.jsonl`` is).

The file is what TensorBoard reads: TFRecord framing (length, masked CRC-32C of the length,
the record, masked CRC-32C of the record) around ``tensorflow.Event`` protocol buffers, the
first carrying ``file_version = "brain.Event:2"`` and the rest ``wall_time``, ``step`` and a
``Summary`` of one ``simple_value``. The few protobuf fields are encoded by hand.

Why not tensorboardX: importing it imports PyTorch when PyTorch is installed (to recognise
its tensors), which cost every ``import mlgen`` ~4 s of its ~9 (measured 2026-12-02 with
``python -X importtime -c "import mlgen.cli"``), in every CLI call and test subprocess.
"""

from __future__ import annotations

import os
import socket
import struct
import time

from etils import epath

__all__ = ["EventWriter", "crc32c"]


def _crc_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli, reflected
        table.append(c)
    return tuple(table)


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``, as TFRecord frames use."""
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", _masked_crc(length))
        + data
        + struct.pack("<I", _masked_crc(data))
    )


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # negative int64s as protobuf does: ten bytes of two's complement
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _bytes_field(field: int, data: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _event(wall_time: float, *, step: int = 0, file_version: str = "", summary=b"") -> bytes:
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time)  # double wall_time = 1
    if step:
        out += _varint(2 << 3 | 0) + _varint(step)  # int64 step = 2
    if file_version:
        out += _bytes_field(3, file_version.encode())  # string file_version = 3
    if summary:
        out += _bytes_field(5, summary)  # Summary summary = 5
    return out


def _scalar_summary(tag: str, value: float) -> bytes:
    # Summary { repeated Value value = 1 }, Value { string tag = 1; float simple_value = 2 }.
    value_msg = _bytes_field(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value)
    return _bytes_field(1, value_msg)


class EventWriter:
    """Scalars to a TensorBoard event file in ``logdir`` (created if missing)."""

    def __init__(self, logdir: str | os.PathLike):
        self.dir = epath.Path(logdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}.mlgen"
        self.path = self.dir / name
        self.remote = "://" in str(logdir)
        self._written = b""  # what the file holds (kept for remote rewrites only)
        self._pending = [_record(_event(now, file_version="brain.Event:2"))]
        self.flush()

    def scalar(self, tag: str, value: float, step: int) -> None:
        summary = _scalar_summary(tag, float(value))
        self._pending.append(_record(_event(time.time(), step=int(step), summary=summary)))

    def flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending = []
        if self.remote:
            self._written += data
            self.path.write_bytes(self._written)
        else:
            with open(os.fspath(self.path), "ab") as f:
                f.write(data)

    def close(self) -> None:
        self.flush()
