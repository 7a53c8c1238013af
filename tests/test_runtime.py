"""GatedRuntime on a tiny hand-exported bundle: the loop against a torch reference, inputs, thread safety.

The same checks on bundles made by the build pipeline (zoo and torchvision models) are in
test_runtime_parity.py.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
from tiny_bundle import SHAPE, make_tiny_bundle

from dgate_export.errors import UserError
from dgate_export.runtime import GatedRuntime, RunResult

NORM = {"scale": 1 / 255, "mean": [0.5], "std": [0.25]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("tiny"), max_batch=16, normalization=NORM)


MODES = {"plain": {}, "buckets": {"batch_buckets": True}, "fixed": {"fixed_buffers": True}}


@pytest.fixture(scope="module", params=list(MODES))
def rt(tiny, request):
    """The runtime as on CPU, with every segment's batch padded to a power of two (as on a GPU), and
    running from fixed-address buffers bound once per (segment, bucket) (what CUDA graphs need)."""
    return GatedRuntime.load(tiny[0], **MODES[request.param])


def _x(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SHAPE)).astype(np.float32)


def _between(conf: np.ndarray, q: float) -> float:
    """A threshold near quantile q of conf, midway in the widest nearby gap (no near-ties across backends)."""
    s = np.sort(conf)
    i = int(np.clip(round(q * (len(s) - 1)), 1, len(s) - 2))
    lo, hi = max(i - len(s) // 8, 0), min(i + len(s) // 8, len(s) - 1)
    j = lo + int(np.argmax(np.diff(s[lo:hi + 1])))
    return float((s[j] + s[j + 1]) / 2)


def _check(res: RunResult, ref, x: np.ndarray, thresholds) -> None:
    logits, exits, conf = ref.early_exit(x, thresholds)
    np.testing.assert_array_equal(res.exits, exits)
    np.testing.assert_allclose(res.logits, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(res.confidence, conf, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(res.predictions, logits.argmax(axis=1))
    np.testing.assert_array_equal(res.exit_counts, np.bincount(exits, minlength=3))
    assert res.logits.dtype == np.float32 and res.exits.dtype == np.int64 and res.confidence.dtype == np.float32


@pytest.mark.parametrize("n", [1, 7, 64])  # 64 > max_batch 16: split into chunks
@pytest.mark.parametrize("plan", ["none", "some", "all0", "all1"])
def test_loop_matches_torch_reference(tiny, rt, n, plan):
    _, ref = tiny
    x = _x(n, seed=n)
    c0, c1 = ref.all_exits(_x(512, seed=99))  # thresholds from a larger sample: mid-gap, no ties
    thresholds = {"none": (2.0, 2.0), "some": (_between(c0, 0.6), _between(c1, 0.4)),
                  "all0": (0.0, 2.0), "all1": (2.0, 0.0)}[plan]
    res = rt.run(x, thresholds=thresholds)
    _check(res, ref, x, thresholds)
    want = {"none": [0, 0, n], "all0": [n, 0, 0], "all1": [0, n, 0]}.get(plan)
    if want:
        assert res.exit_counts.tolist() == want


def test_batch_buckets():
    from dgate_export.backends import batch_bucket

    assert [batch_bucket(n, 24) for n in (1, 2, 3, 5, 8, 9, 17, 24)] == [1, 2, 4, 8, 8, 16, 24, 24]
    with pytest.raises(ValueError):
        batch_bucket(0, 24)


@contextlib.contextmanager
def _batch_sizes(runner, feed: str):
    """Record the batch size (rows of `feed`) of every run of a real runner."""
    seen: list[int] = []
    real = runner.run
    runner.run = lambda feeds, host=None: seen.append(len(feeds[feed])) or real(feeds, host)
    try:
        yield seen
    finally:
        del runner.run


def _slot_runs(runner) -> dict[tuple[int, int | None], int]:
    """{(rows, upstream rows): runs} of the slots a fixed-buffer runner made in this thread."""
    slots = getattr(runner._local, "slots", {})
    return {(rows, up and up[1]): slot.runs for (rows, up), slot in slots.items()}


def test_warmup_runs_every_bucket(tiny, rt):
    if rt._fixed:  # every slot a run can reach: each bucket after each larger or equal one
        rt.warmup()
        runs = _slot_runs(rt._runners[2])
        assert sorted(runs) == [(b, up) for b in (1, 2, 4, 8, 16) for up in (1, 2, 4, 8, 16) if b <= up]
        assert min(runs.values()) >= 1
        return
    with _batch_sizes(rt._runners[1], "index") as seen:
        rt.warmup()
    sizes = [1, 2, 4, 8, 16] if rt._buckets else [1, 16]
    assert rt._one_in_slots  # on the CPU batch 1 runs from slots
    assert _slot_runs(rt._runners[1]).get((1, 1), 0) >= 1
    assert seen == sizes[1:]


# Tables of seconds per run by bucket (1..16) for the three segments: compacting pays, never pays, or
# pays for segment 1 only (segment 2 is fastest at 8 rows, so 2-8 survivors of 16 run at 8).
TABLES = {
    "compact": [{b: b * 1e-3 for b in (1, 2, 4, 8, 16)}] * 3,
    "pad": [{b: 1.0 for b in (1, 2, 4, 8, 16)}] * 3,
    "mixed": [{b: 1.0 for b in (1, 2, 4, 8, 16)}, {b: b * 1e-3 for b in (1, 2, 4, 8, 16)},
              {1: 3.0, 2: 3.0, 4: 2.0, 8: 1.0, 16: 2.0}],
}


def test_next_bucket_follows_the_table(tiny):
    rt = GatedRuntime.load(tiny[0], fixed_buffers=True)
    assert [rt.next_bucket(1, 16, n) for n in (1, 3, 9, 16)] == [1, 4, 16, 16]  # no table: compact
    rt.bucket_times = TABLES["pad"]  # ties: keep the batch
    assert [rt.next_bucket(k, 16, n) for k in (1, 2) for n in (1, 3, 9)] == [16] * 6
    rt.bucket_times = TABLES["mixed"]
    assert [rt.next_bucket(1, 16, n) for n in (1, 3, 9)] == [1, 4, 16]
    assert [rt.next_bucket(2, 16, n) for n in (1, 2, 3, 5, 8, 9)] == [8, 8, 8, 8, 8, 16]
    assert [rt.next_bucket(2, 4, n) for n in (1, 3)] == [4, 4]  # 4 (2 s) beats 1 and 2 (3 s)
    with pytest.raises(UserError, match="3 segments"):
        rt.bucket_times = TABLES["pad"][:2]


@pytest.mark.parametrize("mode", ["buckets", "fixed"])
@pytest.mark.parametrize("table", list(TABLES))
def test_compact_or_pad_gives_the_same_results(tiny, mode, table):
    """Whatever the table decides, every exit pattern gives the torch reference's results, and the
    segments ran at the buckets the table chose."""
    _, ref = tiny
    rt = GatedRuntime.load(tiny[0], **MODES[mode])
    rt.bucket_times = TABLES[table]
    x = _x(16, seed=7)
    c0, c1 = ref.all_exits(_x(512, seed=99))
    some = (_between(c0, 0.6), _between(c1, 0.4))
    for thresholds in [(2.0, 2.0), (0.0, 2.0), (2.0, 0.0), some]:
        before = _slot_runs(rt._runners[2]) if rt._fixed else {}
        with _batch_sizes(rt._runners[2], "index") as seen:
            res = rt.run(x, thresholds=thresholds)
        _check(res, ref, x, thresholds)
        if rt._fixed:
            after = _slot_runs(rt._runners[2])
            seen = [rows for rows, runs in after.items() if runs != before.get(rows, 0)]
            seen = [rows for rows, _ in seen]
        if thresholds == some:  # survivors of 16 at gate 0, then at gate 1
            conf0, conf1 = ref.all_exits(x)
            n1, n2 = int((conf0 < some[0]).sum()), int(((conf0 < some[0]) & (conf1 < some[1])).sum())
            b1 = rt.next_bucket(1, 16, n1)
            assert 0 < n2 < n1 < 16 and seen == [rt.next_bucket(2, b1, n2)]
            if table == "pad":
                assert seen == [16]


def test_buckets_with_a_max_batch_that_is_not_a_power_of_two(tmp_path):
    """max_batch 12: batches of 9-12 rows pad to 12, the last bucket, and warmup runs it too."""
    bundle, ref = make_tiny_bundle(tmp_path, max_batch=12)
    rt = GatedRuntime.load(bundle, batch_buckets=True)
    with _batch_sizes(rt._runners[0], "input") as seen:
        rt.warmup()
        assert seen == [2, 4, 8, 12]  # and 1, from a slot
        seen.clear()
        x = _x(23, seed=5)  # chunks of 12 and 11: both padded to 12
        c0, c1 = ref.all_exits(_x(512, seed=99))
        thresholds = (_between(c0, 0.6), _between(c1, 0.4))
        _check(rt.run(x, thresholds=thresholds), ref, x, thresholds)
        assert seen == [12, 12]


def test_some_thresholds_use_every_exit(tiny, rt):
    _, ref = tiny
    c0, c1 = ref.all_exits(_x(512, seed=99))
    thresholds = (_between(c0, 0.6), _between(c1, 0.4))
    res = rt.run(_x(64, seed=3), thresholds=thresholds)
    assert (res.exit_counts > 0).all(), res.exit_counts  # the test data really exercises all three exits


def test_thresholds_at_load_and_per_call(tiny):
    bundle, _ = tiny
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert GatedRuntime.load(bundle).thresholds == tuple(
        np.float32(s["gate"]["threshold"]) for s in manifest["segments"][:-1])
    rt = GatedRuntime.load(bundle, thresholds=[0.0, 0.0])
    assert rt.run(_x(5)).exit_counts.tolist() == [5, 0, 0]
    assert rt.run(_x(5), thresholds=[2, 2]).exit_counts.tolist() == [0, 0, 5]
    assert rt.thresholds == (0.0, 0.0)  # a per-call override does not stick
    rt.thresholds = [2, 0]
    assert rt.run(_x(5)).exit_counts.tolist() == [0, 5, 0]
    with pytest.raises(UserError, match="3 thresholds given"):
        rt.thresholds = [1, 1, 1]
    for bad, match in [([0.5], "1 thresholds given"), ([0.5, float("nan")], "finite"), (["a", 1], "numbers")]:
        with pytest.raises(UserError, match=match):
            rt.run(_x(2), thresholds=bad)
        with pytest.raises(UserError, match=match):
            GatedRuntime.load(bundle, thresholds=bad)


def test_result_rows_follow_input_rows(rt):
    x = _x(9, seed=5)
    full = rt.run(x, thresholds=[0.45, 0.45])
    perm = np.random.default_rng(1).permutation(9)
    shuffled = rt.run(x[perm], thresholds=[0.45, 0.45])
    np.testing.assert_array_equal(shuffled.exits, full.exits[perm])
    np.testing.assert_allclose(shuffled.logits, full.logits[perm], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("x, match", [
    (np.zeros((1, 8, 8), np.float32), "4 dimensions.*x\\[None\\]"),
    (np.zeros((2, 3, 8, 8), np.float32), "3 channels"),
    (np.zeros((2, 1, 9, 8), np.float32), "9x8.*8x8"),
    (np.zeros((0, 1, 8, 8), np.float32), "empty"),
    (np.zeros((2, 1, 8, 8), bool), "dtype bool"),
    (np.full((2, 1, 8, 8), np.nan, np.float32), "128 non-finite"),
    ([[[[0.0] * 8] * 8]], "numpy array"),
])
def test_bad_input_is_a_user_error(rt, x, match):
    with pytest.raises(UserError, match=match):
        rt.run(x)


def test_float64_is_converted_with_a_warning(rt):
    x = _x(4)
    with pytest.warns(UserWarning, match="float64"):
        res = rt.run(x.astype(np.float64))
    np.testing.assert_array_equal(res.logits, rt.run(x).logits)


def test_integer_pixels_are_normalized(tiny, rt):
    raw = np.random.default_rng(2).integers(0, 256, (6, *SHAPE), dtype=np.uint8)
    as_float = ((raw.astype(np.float32) / 255 - 0.5) / 0.25).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = rt.run(raw)
    want = rt.run(as_float)
    np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.exits, want.exits)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint16, np.int32, np.int64, np.uint32])
def test_integer_input_other_than_uint8_is_refused(rt, dtype):
    with pytest.raises(UserError, match=f"integer dtype {np.dtype(dtype)}: raw pixels are uint8"):
        rt.run(np.ones((2, *SHAPE), dtype))


def test_input_that_overflows_is_refused_like_nan(rt):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no numpy overflow warnings: one clear error
        # finite float32 values so large that the network overflows: rows 1 and 3 of 4
        x = _x(4)
        x[[1, 3]] = 3e38
        for rows in (x, x[1:2]):  # batch and batch-1 paths
            with pytest.raises(UserError, match=r"not finite .*\(rows (1, 3|0)\)"):
                rt.run(rows)
        with pytest.warns(UserWarning, match="float64"), pytest.raises(UserError, match="non-finite"):
            rt.run(np.full((2, *SHAPE), 1e300))  # becomes inf in float32


def test_threshold_exactly_on_a_confidence_lets_the_sample_leave(tiny, rt):
    """Calibration returns observed confidences as thresholds, so real bundles have samples exactly on
    them: confidence >= threshold must leave, in batches and at batch 1, as in torch."""
    _, ref = tiny
    x = _x(48, seed=5)
    torch_c0, torch_c1 = ref.all_exits(x)
    ort_c0 = rt.run(x, thresholds=(0.0, 2.0)).confidence  # everyone leaves at gate 0: its confidences
    ort_c1 = rt.run(x, thresholds=(2.0, 0.0)).confidence
    for gate, ort_c, torch_c in ((0, ort_c0, torch_c0), (1, ort_c1, torch_c1)):
        same = np.nonzero((ort_c == torch_c) & (ort_c > ort_c.min()) & (ort_c < ort_c.max()))[0]
        assert len(same) >= 3, "need rows whose confidence ONNX Runtime and torch compute bit-identically"
        row = int(same[len(same) // 2])
        t = float(ort_c[row])
        # the threshold exactly on the row's float32 confidence, and the double just above it (which
        # rounds to it in float32, the confidences' type: the runtime compares in float32 as torch does)
        for threshold in (t, float(np.nextafter(t, 2.0))):
            assert np.float32(threshold) == ort_c[row]
            thresholds = (threshold, 2.0) if gate == 0 else (2.0, threshold)
            res = rt.run(x, thresholds=thresholds)
            assert res.exits[row] == gate, (gate, threshold)
            _check(res, ref, x, thresholds)
            ones = [rt.run(x[i:i + 1], thresholds=thresholds) for i in range(len(x))]
            np.testing.assert_array_equal(np.concatenate([o.exits for o in ones]), res.exits)
            np.testing.assert_array_equal(np.concatenate([o.logits for o in ones]), res.logits)


def test_integer_pixels_without_normalization_are_refused(tmp_path):
    bundle, _ = make_tiny_bundle(tmp_path / "plain")
    with pytest.raises(UserError, match="no input.normalization"):
        GatedRuntime.load(bundle).run(np.zeros((1, *SHAPE), np.uint8))


def test_damaged_bundles_are_refused(tmp_path):
    bundle, _ = make_tiny_bundle(tmp_path / "b")
    data = bytearray((bundle / "segment1.onnx").read_bytes())
    data[-1] ^= 1
    (bundle / "segment1.onnx").write_bytes(bytes(data))
    with pytest.raises(UserError, match="segment1.onnx \\(mismatch\\)"):
        GatedRuntime.load(bundle)
    (bundle / "segment1.onnx").unlink()
    with pytest.raises(UserError, match="segment1.onnx \\(missing\\)"):
        GatedRuntime.load(bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["format"] = "dgate-bundle/9"  # a later version
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="not supported"):
        GatedRuntime.load(bundle)
    with pytest.raises(UserError, match="not a bundle directory"):
        GatedRuntime.load(tmp_path / "nowhere")


def test_backend_override(tiny):
    bundle, _ = tiny
    with pytest.raises(UserError, match="Unknown backend"):
        GatedRuntime.load(bundle, backend="nope")
    with pytest.raises(UserError, match="tensorrt"):  # no TensorRT here, or no engines in this bundle
        GatedRuntime.load(bundle, backend="tensorrt")
    assert GatedRuntime.load(bundle, backend="onnxruntime", intra_op_num_threads=2).run(_x(3)).logits.shape == (3, 3)
    with pytest.raises(UserError, match="Unknown onnxruntime option"):
        GatedRuntime.load(bundle, threads=2)


def test_fp16_bundle(tmp_path):
    bundle, ref = make_tiny_bundle(tmp_path / "h", precision="fp16", max_batch=8)
    rt = GatedRuntime.load(bundle)
    x = _x(64, seed=4)
    c0, c1 = ref.all_exits(x)
    thresholds = (_between(c0, 0.5), _between(c1, 0.5))
    res = rt.run(x, thresholds=thresholds)  # float32 in, cast to float16 for the graphs
    logits, exits, _ = ref.early_exit(x, thresholds)
    # fp16 moves confidences (by ~2e-5 here): compare exits only where the reference is not near a tie.
    clear = (np.abs(c0 - thresholds[0]) > 1e-3) & (np.abs(c1 - thresholds[1]) > 1e-3)
    assert clear.sum() >= 40
    np.testing.assert_array_equal(res.exits[clear], exits[clear])
    same = res.exits == exits
    np.testing.assert_allclose(res.logits[same], logits[same], atol=1e-2)
    assert res.logits.dtype == np.float32


def test_many_threads_get_their_own_results(rt):
    jobs = [(_x(1 + (i * 7) % 40, seed=i), (0.4 + 0.01 * (i % 9), 0.42 + 0.005 * (i % 5))) for i in range(12)]
    want = [rt.run(x, thresholds=t) for x, t in jobs]
    errors: list[str] = []

    def work(t: int) -> None:
        for j in range(30):
            i = (t * 5 + j) % len(jobs)
            res = rt.run(jobs[i][0], thresholds=jobs[i][1])
            if not (np.array_equal(res.exits, want[i].exits) and np.array_equal(res.logits, want[i].logits)):
                errors.append(f"thread {t} job {i}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert len({tuple(w.exit_counts) for w in want}) > 1  # the jobs really differ


def test_runtime_imports_no_torch(tiny):
    code = (
        "import sys, numpy as np\n"
        "from dgate_export.runtime import GatedRuntime\n"
        f"rt = GatedRuntime.load({str(tiny[0])!r})\n"
        "res = rt.run(np.zeros((2, 1, 8, 8), np.float32))\n"
        "assert res.logits.shape == (2, 3)\n"
        "bad = [m for m in ('torch', 'torchvision', 'onnx', 'tensorrt') if m in sys.modules]\n"
        "print('heavy:', bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "heavy: []" in out.stdout


def test_profile_buckets_measures_every_segment_and_bucket(tiny):
    rt = GatedRuntime.load(tiny[0], fixed_buffers=True)
    table = rt.profile_buckets(repeats=2)
    assert [sorted(seg) for seg in table] == [[1, 2, 4, 8, 16]] * 3
    assert all(t > 0 for seg in table for t in seg.values())
    rt.bucket_times = table
    assert rt.bucket_times == table
    with pytest.raises(UserError, match="bucketed runtime"):
        GatedRuntime.load(tiny[0]).profile_buckets()


@pytest.mark.parametrize("mode", list(MODES))
def test_use_after_close_is_a_user_error(tiny, mode):
    bundle, _ = tiny
    rt = GatedRuntime.load(bundle, **MODES[mode])
    rt.run(_x(3))
    rt.close()
    rt.close()  # twice is harmless
    for use in (lambda: rt.run(_x(3)), lambda: rt.run(_x(1)), rt.warmup, rt.baseline_runner,
                lambda: rt.run(_x(2), thresholds=[0.5, 0.5])):
        with pytest.raises(UserError, match="was closed"):
            use()
