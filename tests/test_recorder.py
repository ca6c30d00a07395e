"""The recorder and the bulk writers behind it: rows by hand, reused input buffers, the device-batching mode,
the Arrow fast path of RunWriter.append, and TensorBoard event files (checksums, protobufs, read-back)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from bnn_probe.probe import recorder as recorder_mod
from bnn_probe.probe.recorder import MISSING_INT, Recorder
from bnn_probe.runlog.schema import HIST_EDGES
from bnn_probe.runlog.tbevents import EventWriter, encode_scalar_events, frame_records, masked_crc32c
from bnn_probe.runlog.writer import RunWriter, nullable_int, string_column

K = len(Recorder.FLOAT_COLUMNS)


def _accumulator(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


# ---------------------------------------------------------------- TensorBoard records
@pytest.fixture(params=["compiled", "numpy"])
def tb_impl(request, monkeypatch):
    """Each TensorBoard test runs on both implementations: the C functions of the probe's extension
    (bnn_probe/probe/_tfrecord.h) and the numpy fallback used where the extension is not built."""
    from bnn_probe.probe import cpu_pass
    from bnn_probe.runlog import tbevents

    if request.param == "numpy":
        monkeypatch.setattr(tbevents, "_native", lambda: None)
    elif cpu_pass.load() is None:
        pytest.skip("the compiled extension is not built")
    return request.param


def test_masked_crc32c_equals_tensorboards_checksum(tb_impl):
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference

    rng = np.random.default_rng(1)
    lengths = np.concatenate([rng.integers(1, 3000, 60), [1, 8, 40_000]])  # 40 kB: past the table, other path
    gaps = rng.integers(0, 5, len(lengths))
    starts = np.cumsum(lengths + gaps) - lengths
    buf = rng.integers(0, 256, int(starts[-1] + lengths[-1]), dtype=np.uint8)
    got = masked_crc32c(buf, starts, lengths)
    want = [reference(buf[a:a + n].tobytes()) for a, n in zip(starts, lengths, strict=True)]
    assert got.tolist() == want
    assert int(masked_crc32c(np.frombuffer(b"123456789", np.uint8), [0], [9])[0]) == reference(b"123456789")


def test_encoded_events_equal_protobufs(tb_impl):
    from tensorboard.compat.proto import event_pb2, summary_pb2

    rng = np.random.default_rng(2)
    tags = ["flip_ratio/fc1.weight", "c2i/fc1.weight", "t" * 300]  # a tag longer than 127 bytes: 2-byte length
    steps = np.array([0, 1, 127, 128, 16_384, 2**40, -5])
    values = rng.normal(size=(len(steps), 3)) * 1e-3
    values[2, 1] = math.nan
    values[5, 0] = 1e300  # beyond float32: written as inf, as protobuf does
    keep = np.ones(values.shape, dtype=bool)
    keep[3, 0] = False
    keep[4] = False  # an event without values
    wall = rng.random(len(steps)) * 2e9
    payload, lengths = encode_scalar_events(tags, steps, wall, values, keep)
    off = 0
    for s in range(len(steps)):
        got = event_pb2.Event.FromString(payload[off:off + lengths[s]].tobytes())
        off += lengths[s]
        want = event_pb2.Event(wall_time=wall[s], step=int(steps[s]), summary=summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=t, simple_value=values[s, v]) for v, t in enumerate(tags) if keep[s, v]]))
        assert got.wall_time == want.wall_time and got.step == want.step
        assert [v.tag for v in got.summary.value] == [v.tag for v in want.summary.value]
        for a, b in zip(got.summary.value, want.summary.value, strict=True):
            assert a.simple_value == b.simple_value or (math.isnan(a.simple_value) and math.isnan(b.simple_value))
    assert off == len(payload)
    framed = frame_records(payload, lengths)
    assert len(framed) == len(payload) + 16 * len(steps)


def test_event_writer_read_back_by_tensorboard(tmp_path, tb_impl):
    w = EventWriter(tmp_path / "tb")
    w.add_scalar("loss", 0.25, 3)
    w.add_scalars_bulk(["a/x", "b/x"], np.array([1, 2, 3]), np.array([[0.1, 1.0], [0.2, 2.0], [0.3, 3.0]]),
                       keep=np.array([[True, True], [True, False], [True, True]]))
    w.add_histogram_raw("h/x", min=0.0, max=3.0, num=6, sum=9.0, sum_squares=17.0, bucket_limits=[1.0, 2.0, 3.0],
                        bucket_counts=[1, 2, 3], global_step=7)
    w.flush()
    w.add_scalar("loss", 0.5, 4)  # after a flush: appended to the same file
    w.close()
    assert len(list((tmp_path / "tb").iterdir())) == 1
    acc = _accumulator(tmp_path / "tb")
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(3, 0.25), (4, 0.5)]
    assert [(e.step, e.value) for e in acc.Scalars("a/x")] == [(s, float(np.float32(v))) for s, v in
                                                               ((1, 0.1), (2, 0.2), (3, 0.3))]
    assert [(e.step, e.value) for e in acc.Scalars("b/x")] == [(1, 1.0), (3, 3.0)]
    h = acc.Histograms("h/x")[0]
    assert h.step == 7 and h.histogram_value.num == 6 and list(h.histogram_value.bucket) == [1, 2, 3]
    # every record's checksums hold (TensorBoard's reader raises DataLossError otherwise)
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader

    f = next((tmp_path / "tb").iterdir())
    assert len(list(RawEventFileLoader(str(f)).Load())) == 1 + 1 + 3 + 1 + 1  # file_version, loss, 3 steps, ...


def test_compiled_and_numpy_records_are_the_same_bytes(monkeypatch):
    """Random scalar events (negative and 2^40 steps, NaN, ±inf, values beyond float32, dropped values, a tag with
    a two-byte length) and their framing: the compiled functions write exactly the numpy functions' bytes."""
    from bnn_probe.probe import cpu_pass
    from bnn_probe.runlog import tbevents

    if cpu_pass.load() is None:
        pytest.skip("the compiled extension is not built")
    rng = np.random.default_rng(5)
    tags = ["flip_ratio/a", "c2i/a", "x" * 200, "threshold/b"]
    steps = np.concatenate([rng.integers(0, 10**6, 50), [-1, 2**40, 0]])
    values = rng.normal(size=(len(steps), 4)) * 10.0 ** rng.integers(-40, 40, (len(steps), 4))
    values[::7, 1] = math.nan
    values[3, 2], values[4, 3] = math.inf, -1e300
    keep = rng.random(values.shape) < 0.8
    keep[5] = False
    wall = rng.random(len(steps)) * 2e9
    out = {}
    for impl in ("compiled", "numpy"):
        if impl == "numpy":
            monkeypatch.setattr(tbevents, "_native", lambda: None)
        payload, lengths = encode_scalar_events(tags, steps, wall, values, keep)
        out[impl] = (payload.tobytes(), lengths.tolist(), frame_records(payload, lengths))
    assert out["compiled"] == out["numpy"]


# ---------------------------------------------------------------- the recorder
def _recorder(tmp_path, L=2, n=(10, 20), buffer_steps=2, tensorboard=False, families=None):
    w = RunWriter(tmp_path / "run", tensorboard=tensorboard)
    rec = Recorder(w, [f"l{i}" for i in range(L)], list(n), families or ["bop"] * L, buffer_steps=buffer_steps)
    return w, rec


def _read(path, table):
    return pq.read_table(path / table).to_pandas()


def test_steps_rows_by_hand_across_drains(tmp_path):
    w, rec = _recorder(tmp_path, buffer_steps=2)
    ints_buf = np.zeros((2, 4), np.int64)
    floats_buf = np.full((2, K), math.nan)
    ints, floats = torch.from_numpy(ints_buf), torch.from_numpy(floats_buf)  # reused every step
    flips = [(1, 2), (3, 0), (0, 4)]
    for t, (f0, f1) in enumerate(flips, start=1):
        ints_buf[:] = [[f0, 5, 0, t * 11], [f1, 2, 1, MISSING_INT]]
        floats_buf[:, 0] = t  # above_threshold
        rec.add_steps(t, ints, floats, np.array([[1e-4, 1e-8, 1e-4, math.nan]] * 2))
        if rec.pending() >= rec.buffer_steps:
            rec.drain()
    rec.flush()
    df = _read(w.path, "steps")
    assert df.step.tolist() == [1, 1, 2, 2, 3, 3] and df.layer.tolist() == ["l0", "l1"] * 3
    assert df.flips.tolist() == [1, 2, 3, 0, 0, 4]
    assert df.flip_ratio.tolist() == [0.1, 0.1, 0.3, 0.0, 0.0, 0.2]
    # running mean of the flip ratio, continued across the drain after step 2
    assert df.flip_ratio_running.tolist() == pytest.approx([0.1, 0.1, 0.2, 0.05, 0.4 / 3, 0.1])
    assert df.c2i.tolist() == [0.5, 0.9] * 3 and df.c2i_corr.tolist() == pytest.approx([0.0, 0.8] * 3)
    assert df.sign_hash.tolist()[::2] == [11, 22, 33] and df.sign_hash.isna().tolist()[1::2] == [True] * 3
    assert df.nonfinite_grads.tolist() == [0, 1] * 3 and df.threshold.tolist() == [1e-8] * 6
    assert df.above_threshold.tolist() == [1, 1, 2, 2, 3, 3] and df.abs_w_mean.isna().all()
    assert str(df.sign_hash.dtype) == "Int64"


def test_running_flip_ratio_does_not_depend_on_when_drains_happen(tmp_path):
    """The running mean continues across drains in the order of one cumulative sum over the run: the same bits
    whether the recorder drains every step, every 3 steps or once (drains follow flush timing)."""
    gen = np.random.default_rng(0)
    flips = gen.integers(0, 7, size=(40, 2))
    cols = []
    for k, buffer_steps in enumerate((1, 3, 64)):
        w, rec = _recorder(tmp_path / str(k), n=(7, 13), buffer_steps=buffer_steps)
        for t, (f0, f1) in enumerate(flips, start=1):
            rec.add_steps(t, torch.tensor([[f0, 0, 0, 0], [f1, 0, 0, 0]]), torch.full((2, K), math.nan),
                          np.full((2, 4), math.nan))
            if rec.pending() >= rec.buffer_steps:
                rec.drain()
        rec.flush()
        cols.append(_read(w.path, "steps").flip_ratio_running.to_numpy())
    assert np.array_equal(cols[0], cols[1]) and np.array_equal(cols[0], cols[2])
    ratio = flips / np.array([7, 13])
    assert np.array_equal(cols[2].reshape(40, 2), np.cumsum(ratio, axis=0) / np.arange(1, 41)[:, None])


def test_pending_copies_reused_numpy_buffers_and_rechecks_after_a_layout_change():
    """The every-step path for the same numpy buffers step after step copies their values (not references); after a
    drain that changes the layout, an old buffer of the other shape is refused (the caller drains), not broadcast."""
    p = recorder_mod._Pending(4)
    a, h = np.zeros(3), np.zeros((2, 2))
    for t in (1, 2, 3):
        a[:], h[:] = t, -t
        assert p.add(t, (a, h), wall=float(t))
    steps, wall, (xa, xh) = p.take()
    assert steps.tolist() == [1, 2, 3] and wall.tolist() == [1.0, 2.0, 3.0]
    assert xa.tolist() == [[1.0] * 3, [2.0] * 3, [3.0] * 3] and xh[:, 0, 0].tolist() == [-1.0, -2.0, -3.0]
    assert p.add(4, (np.ones(2), h))  # a new layout after the drain
    assert not p.add(5, (a, h))  # a's shape (3,) no longer fits the buffers (2,)
    assert p.add(5, (np.full(2, 5.0), h))
    assert p.take()[2][0].tolist() == [[1.0, 1.0], [5.0, 5.0]]


def test_pending_rows_reserved_and_written_in_place_mix_with_added_rows():
    """reserve hands out the address of the next row (the probe's compiled pass writes there), commit takes it;
    added rows and reserved rows interleave in step order; a full buffer, device mode or another layout give None."""
    import ctypes

    p = recorder_mod._Pending(3)
    lay = (((2,), np.dtype(np.float64)), ((1,), np.dtype(np.int64)))
    assert p.add(1, (np.array([1.0, 1.5]), np.array([10])))
    addr = p.reserve(lay)
    assert addr is not None and p.reserve(lay) == addr  # not taken until commit
    ctypes.memmove(addr[0], np.array([2.0, 2.5]).ctypes.data, 16)
    ctypes.memmove(addr[1], np.array([20]).ctypes.data, 8)
    p.commit(2, wall=2.0)
    assert p.reserve((((3,), np.dtype(np.float64)), lay[1])) is None  # another layout mid-buffer
    assert p.add(3, (np.array([3.0, 3.5]), np.array([30])))
    assert p.reserve(lay) is None  # full
    steps, wall, (f, i) = p.take()
    assert steps.tolist() == [1, 2, 3] and wall[1] == 2.0
    assert f.tolist() == [[1.0, 1.5], [2.0, 2.5], [3.0, 3.5]] and i.ravel().tolist() == [10, 20, 30]
    assert p.reserve((((3,), np.dtype(np.float64)), lay[1])) is not None  # empty: made for the new layout


def test_hyperparameters_kept_where_they_change_across_reserved_and_added_rows_and_drains(tmp_path):
    """Each steps row gets the γ, τ, lr, σ in force at its step, though the recorder keeps only change points:
    rows committed in place (identity of the hyperparameter array), rows added (compared by value, since the
    caller may change its array in place, or by identity where the caller says so), a new array with equal values,
    NaN, and drains in between."""
    import ctypes

    w, rec = _recorder(tmp_path, buffer_steps=3)
    pend = rec._steps
    ints, floats = np.zeros((2, 4), np.int64), np.full((2, K), math.nan)
    lay = (((2, 4), np.dtype(np.int64)), ((2, K), np.dtype(np.float64)))
    a = np.array([[1e-3, 1e-6, 1e-3, math.nan]] * 2)
    b = np.array([[1e-3, 2e-6, 1e-3, math.nan], [5e-4, 2e-6, 5e-4, math.nan]])
    mutable = a.copy()
    want = {}
    c = np.array([[2e-3, 1e-6, 2e-3, 0.5]] * 2)
    plan = [("commit", a), ("commit", a), ("add", mutable), ("commit", a), ("commit", b), ("commit", b.copy()),
            ("add", mutable), ("mutate", None), ("commit", a), ("commit", a), ("add_id", a), ("add_id", c),
            ("commit", c), ("add_id", a)]
    t = 0
    for how, h in plan:
        if how == "mutate":  # the caller's array changed in place: the next added row must see it
            mutable[:, 1] = 7e-6
            t += 1
            rec.add_steps(t, ints, floats, mutable)
            want[t] = mutable.copy()
        elif how in ("add", "add_id"):  # add_id: the caller passes a new array on a change (Probe._hyper)
            t += 1
            rec.add_steps(t, ints, floats, h, hyper_identity=how == "add_id")
            want[t] = h.copy()
        else:
            t += 1
            addr = rec.buffer("steps").reserve(lay)
            if addr is None:  # full: drained as the probe's hook would, then reserved again
                rec.drain()
                addr = rec.buffer("steps").reserve(lay)
            ctypes.memmove(addr[0], ints.ctypes.data, ints.nbytes)
            ctypes.memmove(addr[1], floats.ctypes.data, floats.nbytes)
            rec.commit_step(t, h, events=False, tracked=False)
            want[t] = h.copy()
        if rec.pending() >= rec.buffer_steps:
            rec.drain()
    assert pend.n == 0 or len(rec._hyper_at) <= pend.n  # only change points are kept
    rec.flush()
    df = _read(w.path, "steps")
    assert df.step.tolist() == [s for s in range(1, t + 1) for _ in range(2)]
    got = df[["gamma", "threshold", "lr", "sigma"]].to_numpy().reshape(t, 2, 4)
    np.testing.assert_array_equal(got, np.stack([want[s] for s in range(1, t + 1)]))


def test_tracked_and_events_rows_by_hand(tmp_path):
    w, rec = _recorder(tmp_path, buffer_steps=8)
    rec.track_layout = [(0, np.array([3, 7])), (2, np.array([0]))]
    rec.events_per_layer = 3
    signs = np.zeros(3, bool)
    tfl = np.zeros((3, 2))
    ev_i = np.zeros((6, 2), np.int64)
    ev_f = np.zeros((6, 2))
    for t in (1, 2):
        signs[:] = [t == 1, True, False]
        tfl[:] = [[t, 0.5], [2 * t, 0.25], [3 * t, 0.125]]
        # layer 0: index 4 twice (kept once, the first slot), an empty slot; layer 1: one flip, never flipped before
        ev_i[:] = [[4, 2], [4, 9], [-1, -1], [t, -1], [-1, -1], [-1, -1]]
        ev_f[:] = np.arange(12).reshape(6, 2) + 100 * t
        rec.add_tracked(t, torch.from_numpy(signs), torch.from_numpy(tfl))
        rec.add_events(t, torch.from_numpy(ev_i), torch.from_numpy(ev_f))
    rec.flush()
    tr = _read(w.path, "tracked")
    assert tr.layer.tolist() == ["l0", "l0", "l1"] * 2 and tr["index"].tolist() == [3, 7, 0] * 2
    assert tr.sign.tolist() == [1, 1, -1, -1, 1, -1] and str(tr.sign.dtype) == "int8"
    assert tr.inertia.tolist() == [1, 2, 3, 2, 4, 6] and tr.step_size.tolist() == [0.5, 0.25, 0.125] * 2
    ev = _read(w.path, "events")
    assert ev.step.tolist() == [1, 1, 2, 2] and ev.layer.tolist() == ["l0", "l1"] * 2
    assert ev["index"].tolist() == [4, 1, 4, 2]
    assert ev.inertia_before.tolist() == [100, 106, 200, 206] and ev.step_size.tolist() == [101, 107, 201, 207]
    assert ev.steps_since_last_flip.tolist()[0] == 2 and ev.steps_since_last_flip.isna().tolist() == [False, True] * 2


def test_hists_snapshots_train_and_weight_flips(tmp_path):
    w, rec = _recorder(tmp_path, tensorboard=True)
    nb = len(HIST_EDGES["abs_m"]) + 1
    cnt = np.zeros(nb, np.int64)
    cnt[[0, 5, nb - 1]] = [2, 3, 4]
    rec.add_hist(10, 1, "abs_m", torch.from_numpy(cnt), torch.tensor([0.0, 9.0, 12.0, 50.0], dtype=torch.float64))
    cnt[:] = 0  # the recorder copied it
    bits = np.array([True, False, True] + [False] * 7)
    rec.add_snapshot(10, 0, torch.from_numpy(bits))
    bits[:] = True
    rec.add_train(10, 1, {"loss": 0.5, "acc": 0.75})
    rec.add_train(None, 2, {"val_loss": 0.25})
    rec.flush()
    rec.write_weight_flips(10, [torch.tensor([0, 0, 2, 1], dtype=torch.int32), torch.tensor([3, 3])])
    w.close()
    h = _read(w.path, "hists")
    edges = HIST_EDGES["abs_m"]
    assert h.layer.tolist() == ["l1"] * 3 and h.quantity.tolist() == ["abs_m"] * 3
    assert h.bin.tolist() == [0, 5, nb - 1] and h["count"].tolist() == [2, 3, 4]
    assert h.left.tolist() == [-math.inf, edges[4], edges[-1]] and h.right.tolist() == [edges[0], edges[5], math.inf]
    s = _read(w.path, "snapshots")
    assert s.n_weights.tolist() == [10] and s.signs[0] == np.packbits([1, 0, 1, 0, 0, 0, 0, 0, 0, 0]).tobytes()
    tr = _read(w.path, "train")
    assert tr.name.tolist() == ["loss", "acc", "val_loss"] and tr.value.tolist() == [0.5, 0.75, 0.25]
    assert tr.step.tolist()[:2] == [10, 10] and pd.isna(tr.step[2]) and tr.epoch.tolist() == [1, 1, 2]
    wf = pd.read_parquet(w.path / "weight_flips.parquet")
    assert wf.layer.tolist() == ["l0", "l0", "l0", "l1"] and wf.flips_per_weight.tolist() == [0, 1, 2, 3]
    assert wf.n.tolist() == [2, 1, 1, 2]
    acc = _accumulator(w.path / "tb")
    assert [(e.step, e.value) for e in acc.Scalars("val_loss")] == [(2, 0.25)]
    hv = acc.Histograms("abs_m/l1")[0].histogram_value
    assert list(hv.bucket) == [2, 3, 4] and hv.num == 9 and hv.bucket_limit[-1] == 9.0


def test_device_batching_mode_gives_the_same_rows(tmp_path, monkeypatch):
    """The path for device tensors (kept, stacked and copied once at the drain), simulated on the CPU."""
    def record(root, device_mode):
        if device_mode:
            monkeypatch.setattr(recorder_mod, "_on_device", lambda x: isinstance(x, torch.Tensor))
        w, rec = _recorder(root, buffer_steps=3)
        rec.track_layout = [(0, np.array([1])), (1, np.array([2]))]
        rec.events_per_layer = 1
        for t in range(1, 6):
            ints = torch.tensor([[t, 1, 0, t], [2 * t, 0, 0, MISSING_INT]])
            rec.add_steps(t, ints, torch.full((2, K), float(t), dtype=torch.float64), np.full((2, 4), 0.5))
            rec.add_tracked(t, torch.tensor([True, t % 2 == 0]), torch.tensor([[t, 1.0], [t, 2.0]],
                                                                              dtype=torch.float64))
            rec.add_events(t, torch.tensor([[t, 1], [-1, -1]]), torch.tensor([[1.0, 2.0], [0, 0]],
                                                                              dtype=torch.float64))
            if rec.pending() >= rec.buffer_steps:
                rec.drain()
        rec.flush()
        monkeypatch.undo()
        return {t: _read(w.path, t) for t in ("steps", "tracked", "events")}

    host, dev = record(tmp_path / "a", False), record(tmp_path / "b", True)
    for t in host:
        pd.testing.assert_frame_equal(host[t], dev[t])
    assert host["steps"].flips.tolist() == [1, 2, 2, 4, 3, 6, 4, 8, 5, 10]


def test_append_columns_equals_dataframe_path(tmp_path):
    """RunWriter.append from a dict of columns gives the part the DataFrame path gives: schema (pandas metadata
    included) and values."""
    w = RunWriter(tmp_path / "run", tensorboard=False)
    n = 5
    rng = np.random.default_rng(3)
    cols = {"step": np.arange(n), "layer": string_column(np.array([0, 1, 0, 1, 1]), ["a", "b"]),
            "index": rng.integers(0, 9, n), "inertia_before": rng.random(n),
            "steps_since_last_flip": nullable_int(np.array([1, 0, 3, 0, 5]), np.array([0, 1, 0, 1, 0], bool)),
            "step_size": rng.random(n)}
    df = pd.DataFrame({"step": cols["step"], "layer": ["a", "b", "a", "b", "b"], "index": cols["index"],
                       "inertia_before": cols["inertia_before"],
                       "steps_since_last_flip": pd.array([1, None, 3, None, 5], dtype="Int64"),
                       "step_size": cols["step_size"]})
    a = w.append("events", cols)
    b = w.append("events", df)
    assert pq.read_schema(a).equals(pq.read_schema(b), check_metadata=True)
    pd.testing.assert_frame_equal(pd.read_parquet(a), pd.read_parquet(b))
    with pytest.raises(ValueError, match="not in the events table"):
        w.append("events", {**cols, "bogus": np.zeros(n)})
