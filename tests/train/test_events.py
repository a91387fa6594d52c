"""mlgen's own TensorBoard event files (``mlgen.train.events``): framed and encoded as
TensorBoard reads them. The records are decoded here with tensorboardX's copy of TensorBoard's
``Event`` protocol buffer (a test dependency only). What this does not cover: TensorBoard's UI."""

import struct

import pytest
from tensorboardX.proto import event_pb2

from mlgen.train.events import EventWriter, _masked_crc, crc32c


def _records(path):
    data = path.read_bytes()
    out, i = [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i : i + 8])
        assert struct.unpack("<I", data[i + 8 : i + 12])[0] == _masked_crc(data[i : i + 8])
        rec = data[i + 12 : i + 12 + n]
        assert struct.unpack("<I", data[i + 12 + n : i + 16 + n])[0] == _masked_crc(rec)
        out.append(event_pb2.Event.FromString(rec))
        i += 16 + n
    return out


def test_crc32c_is_castagnolis():
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value
    assert crc32c(b"") == 0


def test_scalars_round_trip_through_the_event_proto(tmp_path):
    w = EventWriter(tmp_path / "tb")
    w.scalar("loss", 2.5, 1)
    w.scalar("lr", 1e-3, 1)
    w.flush()
    w.scalar("loss", 0.125, 2**40)
    w.close()
    (path,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    first, *events = _records(path)
    assert first.file_version == "brain.Event:2" and first.wall_time > 0
    got = [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value]
    assert got == [(1, "loss", 2.5), (1, "lr", pytest.approx(1e-3)), (2**40, "loss", 0.125)]
    assert all(e.wall_time >= first.wall_time for e in events)
