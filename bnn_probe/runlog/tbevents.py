"""TensorBoard event files written in bulk: the run's ``tb/`` folder without a per-scalar Python call.

The format is TensorFlow's: a file ``events.out.tfevents.<time>.<host>.<pid>.<n>`` of records
``uint64 length | uint32 masked CRC-32C of length | Event protobuf | uint32 masked CRC-32C of the Event``; an
``Event`` has ``wall_time`` (double), ``step`` (int64) and a ``Summary`` whose values carry a ``tag`` and a
``simple_value`` (float32) or a ``histo``. :class:`torch.utils.tensorboard.SummaryWriter` builds one protobuf per
scalar and checksums it with a pure-Python CRC-32C (about 0.1 µs per byte) in a background thread; here the probe's
per-step scalars of a whole batch of steps are encoded at once with numpy (:func:`encode_scalar_events`: one event
per step holding every layer's values), and the checksums of all records are computed together. Where the probe's C
extension is built, its functions do both (bnn_probe/probe/_tfrecord.h: one pass, table-driven CRC-32C); else numpy
does (:func:`masked_crc32c`: CRC-32C by superposition — the CRC register is linear in the message bits, so a
message's CRC is the XOR of one table entry per byte, indexed by the byte's value and its distance from the end).
Both give the same bytes (tests/test_recorder.py).

The values are the ones ``SummaryWriter.add_scalar`` writes (``simple_value`` = the value rounded to float32);
TensorBoard and :class:`tensorboard.backend.event_processing.event_accumulator.EventAccumulator` read them as usual.

Example:
    >>> hex(int(masked_crc32c(np.frombuffer(b"123456789", np.uint8), np.array([0]), np.array([9]))[0]))
    '0xc78ab0e5'
"""

from __future__ import annotations

import os
import socket
import time
from itertools import count
from pathlib import Path

import numpy as np

__all__ = ["EventWriter", "masked_crc32c", "encode_scalar_events", "frame_records"]

_POLY = 0x82F63B78  # CRC-32C (Castagnoli), reflected
_MASK_DELTA = 0xA282EAD8
_MAX_TABLE = 1 << 15  # longest message checksummed by table (the table takes 1 KiB per byte of length)
_UID = count()


def _byte_table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(_POLY), t >> 1).astype(np.uint32)
    return t


_T0 = _byte_table()


def _shift(c: np.ndarray) -> np.ndarray:
    """One zero byte through the CRC register."""
    return _T0[c & 0xFF] ^ (c >> 8)


def _first_rows(n: int) -> np.ndarray:
    h = np.empty((n, 256), dtype=np.uint32)
    h[0] = _T0
    for d in range(1, n):
        h[d] = _shift(h[d - 1])
    return h


# _H[d, b]: CRC register (started at 0) after the byte b followed by d zero bytes; _Z[n]: the register started at
# 0xFFFFFFFF after n zero bytes. Both grow on demand up to the longest message seen.
_H = _first_rows(8)
_Z = np.empty(0, dtype=np.uint32)


def _zero_bytes(c: np.ndarray, k: np.ndarray) -> np.ndarray:
    """The registers ``c`` after ``k`` ≥ 4 zero bytes each, from ``_H``: a register's 4 bytes act as the first 4
    message bytes, so A^k(c) = ⨁_j H[k−1−j, byte_j(c)]."""
    out = np.zeros(np.broadcast(c, k).shape, dtype=np.uint32)
    for j in range(4):
        out ^= _H[k - 1 - j, (c >> np.uint32(8 * j)) & np.uint32(0xFF)]
    return out


def _grow(n: int) -> None:
    """Extend ``_H`` to distances < n and ``_Z`` to lengths ≤ n (at least doubling, so growth is amortised)."""
    global _H, _Z
    have = _H.shape[0]
    if have < n:
        size = max(n, 2 * have)
        h = np.empty((size, 256), dtype=np.uint32)
        h[:have] = _H
        for d in range(have, size):
            h[d] = _shift(h[d - 1])
        _H = h
    if len(_Z) < n + 1:
        size = _H.shape[0]
        z = np.empty(size + 1, dtype=np.uint32)
        z[0] = 0xFFFFFFFF
        for i in range(1, 4):
            z[i] = _shift(z[i - 1:i])[0]
        z[4:] = _zero_bytes(np.uint32(0xFFFFFFFF), np.arange(4, size + 1))
        _Z = z


def _crc_raw(data: np.ndarray, lengths: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """XOR of ``_H[distance to the segment's end, byte]`` over each segment of the contiguous ``data``."""
    total = len(data)
    _grow(int(lengths.max()))
    ends = (np.cumsum(lengths) - 1).astype(np.int32)
    idx = ends[seg]
    idx -= np.arange(total, dtype=np.int32)
    idx <<= 8
    idx |= data
    first = np.cumsum(lengths) - lengths
    return np.bitwise_xor.reduceat(_H.reshape(-1).take(idx), first)


def _finish(raw: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """CRC register → masked CRC-32C: ``c = raw ⊕ Z[n] ⊕ 0xFFFFFFFF``, then ``((c >> 15) | (c << 17)) + 0xA282EAD8``."""
    c = (raw ^ _Z[lengths] ^ np.uint32(0xFFFFFFFF)).astype(np.uint64)
    return ((((c >> np.uint64(15)) | (c << np.uint64(17))) + np.uint64(_MASK_DELTA)) & np.uint64(0xFFFFFFFF)) \
        .astype(np.uint32)


def masked_crc32c(buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Masked CRC-32C (TFRecord's checksum) of each segment ``buf[starts[i] : starts[i] + lengths[i]]``.

    The segments must be non-empty. Vectorised: one table lookup per byte, ``CRC(M) = Z[n] ⊕ 0xFFFFFFFF ⊕
    ⨁_i H[n−1−i, M_i]``, then the mask ``((c >> 15) | (c << 17)) + 0xA282EAD8``.
    """
    starts = np.ascontiguousarray(starts, dtype=np.int64)
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    if len(starts) == 0:
        return np.zeros(0, dtype=np.uint32)
    nat = _native()
    if nat is not None:
        buf = np.ascontiguousarray(buf, dtype=np.uint8)
        out = np.empty(len(starts), dtype=np.uint32)
        nat.crc(buf.ctypes.data, starts.ctypes.data, lengths.ctypes.data, len(starts), out.ctypes.data)
        return out
    long = lengths > _MAX_TABLE
    if long.any():  # rare (a histogram with thousands of buckets): TensorBoard's own checksum for those
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as slow

        out = np.empty(len(starts), dtype=np.uint32)
        short = ~long
        out[short] = masked_crc32c(buf, starts[short], lengths[short]) if short.any() else []
        out[long] = [slow(buf[a:a + n].tobytes()) for a, n in zip(starts[long], lengths[long], strict=True)]
        return out
    seg = np.repeat(np.arange(len(starts), dtype=np.int32), lengths)
    first = np.cumsum(lengths) - lengths
    data = buf[(starts - first)[seg] + np.arange(len(seg))]
    return _finish(_crc_raw(data, lengths, seg), lengths)


def frame_records(payload: np.ndarray, lengths: np.ndarray) -> bytes:
    """TFRecord framing of consecutive messages (``payload`` = the messages back to back, uint8)."""
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    n = len(lengths)
    if n == 0:
        return b""
    nat = _native()
    if nat is not None:
        payload = np.ascontiguousarray(payload, dtype=np.uint8)
        out = np.empty(len(payload) + 16 * n, dtype=np.uint8)
        nat.frame(payload.ctypes.data, lengths.ctypes.data, n, out.ctypes.data)
        return out.tobytes()
    head = lengths.astype("<u8").view(np.uint8)  # [8·n]
    head_crc = masked_crc32c(head, np.arange(n) * 8, np.full(n, 8))
    if lengths.max() > _MAX_TABLE:
        data_crc = masked_crc32c(payload, np.cumsum(lengths) - lengths, lengths)
        seg = np.repeat(np.arange(n, dtype=np.int32), lengths)
    else:
        seg = np.repeat(np.arange(n, dtype=np.int32), lengths)
        data_crc = _finish(_crc_raw(payload, lengths, seg), lengths)
    rec = np.cumsum(lengths + 16) - (lengths + 16)  # where each record begins
    out = np.empty(int(rec[-1] + lengths[-1] + 16), dtype=np.uint8)
    out[(rec[:, None] + np.arange(8)).reshape(-1)] = head
    out[(rec[:, None] + 8 + np.arange(4)).reshape(-1)] = head_crc.astype("<u4").view(np.uint8)
    pos = np.arange(len(payload), dtype=np.int64)
    pos += 12
    pos += 16 * seg
    out[pos] = payload
    out[(rec[:, None] + 12 + lengths[:, None] + np.arange(4)).reshape(-1)] = data_crc.astype("<u4").view(np.uint8)
    return out.tobytes()


def _varint(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Protobuf varints of int64 values (negative ones as their 10-byte two's complement): ([N, 10] bytes, sizes)."""
    u = np.asarray(x, dtype=np.int64).view(np.uint64)
    groups = np.stack([(u >> np.uint64(7 * k)) & np.uint64(0x7F) for k in range(10)], 1).astype(np.uint8)
    nz = groups != 0
    size = np.where(nz.any(1), 10 - np.argmax(nz[:, ::-1], axis=1), 1)
    cont = np.arange(10)[None, :] < (size - 1)[:, None]
    return groups | (cont.astype(np.uint8) << 7), size


def _varint_bytes(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _scatter(out: np.ndarray, at: np.ndarray, data: np.ndarray, sizes: np.ndarray | None = None) -> None:
    """``out[at[i] : at[i] + w] = data[i]`` for rows ``data`` [N, w] (only the first ``sizes[i]`` bytes if given)."""
    pos = at[:, None] + np.arange(data.shape[1])
    if sizes is None:
        out[pos.reshape(-1)] = data.reshape(-1)
    else:
        m = np.arange(data.shape[1])[None, :] < sizes[:, None]
        out[pos[m]] = data[m]


def encode_scalar_events(tags: list[str], steps: np.ndarray, wall: np.ndarray, values: np.ndarray,
                         keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Serialized ``Event`` protobufs, one per row of ``values`` [S, V]: ``wall_time = wall[s]``, ``step =
    steps[s]`` and a ``Summary`` with ``Value(tag=tags[v], simple_value=values[s, v])`` for each v where
    ``keep[s, v]`` (default: all), in tag order. Returns (the events back to back as uint8, their lengths)."""
    steps = np.ascontiguousarray(steps, dtype=np.int64)
    S, V = len(steps), len(tags)
    with np.errstate(over="ignore"):  # beyond float32: ±inf, as protobuf stores it
        vals = np.asarray(values, dtype=np.float64).reshape(S, V).astype("<f4")
    keep = np.ones((S, V), dtype=bool) if keep is None else np.asarray(keep, dtype=bool).reshape(S, V)
    pre = []
    for t in tags:
        tb = t.encode()
        inner = b"\x0a" + _varint_bytes(len(tb)) + tb + b"\x15"
        pre.append(b"\x0a" + _varint_bytes(len(inner) + 4) + inner)
    rec_len = np.array([len(p) + 4 for p in pre], dtype=np.int64)
    nat = _native()
    if nat is not None:
        pre_all = np.frombuffer(b"".join(pre), np.uint8)
        pre_off = np.concatenate([[0], np.cumsum(rec_len - 4)]).astype(np.int64)
        vals = np.ascontiguousarray(vals)
        keep8 = np.ascontiguousarray(keep).view(np.uint8)
        wall = np.ascontiguousarray(wall, dtype="<f8").reshape(S)
        out = np.empty(int(S * (31 + rec_len.sum())), dtype=np.uint8)  # every value kept, 10-byte varints
        ev_len = np.empty(S, dtype=np.int64)
        size = nat.scalars(S, V, steps.ctypes.data, wall.ctypes.data, vals.ctypes.data, keep8.ctypes.data,
                           pre_all.ctypes.data, pre_off.ctypes.data, out.ctypes.data, ev_len.ctypes.data)
        return out[:size], ev_len
    kept_len = keep * rec_len[None, :]
    summ = kept_len.sum(1)
    sv, sn = _varint(steps)
    lv, ln = _varint(summ)
    ev_len = 9 + 1 + sn + 1 + ln + summ
    start = np.cumsum(ev_len) - ev_len
    out = np.empty(int(ev_len.sum()), dtype=np.uint8)
    out[start] = 0x09  # wall_time: field 1, fixed64
    _scatter(out, start + 1, np.asarray(wall, dtype="<f8").reshape(S, 1).view(np.uint8))
    out[start + 9] = 0x10  # step: field 2, varint
    _scatter(out, start + 10, sv, sn)
    at = start + 10 + sn
    out[at] = 0x2A  # summary: field 5, length-delimited
    _scatter(out, at + 1, lv, ln)
    base = at + 1 + ln
    offs = np.cumsum(kept_len, 1) - kept_len
    fbytes = vals.view(np.uint8).reshape(S, V, 4)
    for v, p in enumerate(pre):
        rows = np.flatnonzero(keep[:, v])
        if len(rows) == 0:
            continue
        pos = base[rows] + offs[rows, v]
        _scatter(out, pos, np.broadcast_to(np.frombuffer(p, np.uint8), (len(rows), len(p))))
        _scatter(out, pos + len(p), fbytes[rows, v])
    return out, ev_len


def _native():
    """The compiled record functions (bnn_probe/probe/_tfrecord.h: the same bytes, without numpy's passes), or None
    when the extension is not built; the numpy functions of this module are then used."""
    from ..probe import cpu_pass

    ks = cpu_pass.load()
    return None if ks is None else ks["tb"]


class EventWriter:
    """One TensorBoard event file in ``logdir`` (created with its ``file_version`` record on construction).

    The subset of :class:`torch.utils.tensorboard.SummaryWriter` the run log uses — :meth:`add_scalar`,
    :meth:`add_histogram_raw`, :meth:`flush`, :meth:`close` — plus :meth:`add_scalars_bulk` for many steps at
    once. Records are kept in memory and written (checksummed in one pass) at :meth:`flush`/:meth:`close`."""

    def __init__(self, logdir: str | os.PathLike) -> None:
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_UID)}"
        self.path = self.logdir / name
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self._chunks: list[tuple[np.ndarray, np.ndarray]] = []
        self._protos: list[bytes] = []
        from tensorboard.compat.proto import event_pb2

        self._add_proto(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        self.flush()

    def _add_proto(self, event) -> None:
        self._protos.append(event.SerializeToString())

    def _take_protos(self) -> None:
        if self._protos:
            b = self._protos
            self._protos = []
            self._chunks.append((np.frombuffer(b"".join(b), np.uint8), np.array([len(x) for x in b])))

    def add_scalars_bulk(self, tags: list[str], steps: np.ndarray, values: np.ndarray,
                         keep: np.ndarray | None = None, walltime: np.ndarray | None = None) -> None:
        """One event per step with the values ``values[s, v]`` of ``tags[v]`` where ``keep[s, v]``
        (:func:`encode_scalar_events`); ``walltime`` defaults to now."""
        steps = np.asarray(steps, dtype=np.int64)
        if len(steps) == 0 or not tags:
            return
        wall = np.full(len(steps), time.time()) if walltime is None else np.asarray(walltime, dtype=np.float64)
        self._take_protos()
        self._chunks.append(encode_scalar_events(tags, steps, wall, values, keep))

    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None,
                   walltime: float | None = None) -> None:
        """``SummaryWriter.add_scalar``: one event (``simple_value`` = the value as float32)."""
        self.add_scalars_bulk([tag], np.array([0 if global_step is None else int(global_step)]),
                              np.array([[float(scalar_value)]]),
                              walltime=None if walltime is None else np.array([float(walltime)]))

    def add_histogram_raw(self, tag: str, min: float, max: float, num: int, sum: float, sum_squares: float,
                          bucket_limits: list[float], bucket_counts: list[float], global_step: int | None = None,
                          walltime: float | None = None) -> None:
        """``SummaryWriter.add_histogram_raw``: one event with a ``HistogramProto``."""
        from tensorboard.compat.proto import event_pb2, summary_pb2

        if len(bucket_limits) != len(bucket_counts):
            raise ValueError("len(bucket_limits) != len(bucket_counts), see the document.")
        hist = summary_pb2.HistogramProto(min=min, max=max, num=num, sum=sum, sum_squares=sum_squares,
                                          bucket_limit=bucket_limits, bucket=bucket_counts)
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, histo=hist)])
        self._add_proto(event_pb2.Event(wall_time=time.time() if walltime is None else walltime,
                                        step=0 if global_step is None else int(global_step), summary=summary))

    def flush(self) -> None:
        """Checksum and write every pending record, then flush the file."""
        self._take_protos()
        if self._chunks:
            chunks, self._chunks = self._chunks, []
            payload = np.concatenate([c[0] for c in chunks])
            lengths = np.concatenate([c[1] for c in chunks])
            self._file.write(frame_records(payload, lengths))
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self.flush()
            self._file.close()
