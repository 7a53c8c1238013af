"""data.py: Fashion-MNIST IDX parsing, seeded splits, npz checks, channel repetition."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from dgate_export.data import DEFAULT_FMNIST_DIR, Dataset, check_input_shape, load_dataset, read_idx
from dgate_export.errors import UserError

needs_fmnist = pytest.mark.skipif(
    not (DEFAULT_FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(7, 5, 4)).astype(np.uint8)
    _write_idx(tmp_path / "a.gz", images)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), images)


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(UserError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    header = bytes([0, 0, 0x08, 1]) + np.array([10], dtype=">u4").tobytes()
    (tmp_path / "short").write_bytes(header + b"\x00" * 3)
    with pytest.raises(UserError, match="truncated"):
        read_idx(tmp_path / "short")


def test_fashion_mnist_from_data_dir(tmp_path):
    rng = np.random.default_rng(1)
    for prefix, n in (("train", 30), ("t10k", 12)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, size=(n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, size=n))
    train = load_dataset("fashion-mnist", "train", data_dir=tmp_path, val_size=10)
    val = load_dataset("fashion-mnist", "val", data_dir=tmp_path, val_size=10)
    test = load_dataset("fashion-mnist", "test", data_dir=tmp_path)
    assert (len(train), len(val), len(test)) == (20, 10, 12)
    assert train.x.shape == (20, 1, 28, 28) and train.x.dtype == np.float32 and train.y.dtype == np.int64
    assert len(train.class_names) == 10 and train.normalization["scale"] == pytest.approx(1 / 255)
    # Normalization is x = (raw * scale - mean) / std: undo it and get the bytes back.
    raw = read_idx(tmp_path / "t10k-images-idx3-ubyte.gz")
    norm = test.normalization
    back = (test.x[:, 0] * norm["std"][0] + norm["mean"][0]) / norm["scale"]
    np.testing.assert_allclose(back, raw, atol=1e-3)


def test_fashion_mnist_missing_files_says_how_to_install(tmp_path):
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", "test", data_dir=tmp_path)


@needs_fmnist
def test_fashion_mnist_splits_are_disjoint_and_seeded():
    train = load_dataset("fashion-mnist", "train", val_size=5000)
    val = load_dataset("fashion-mnist", "val", val_size=5000)
    again = load_dataset("fashion-mnist", "val", val_size=5000)
    other = load_dataset("fashion-mnist", "val", val_size=5000, seed=1)
    assert (len(train), len(val)) == (55000, 5000)
    np.testing.assert_array_equal(val.x, again.x)
    assert not np.array_equal(val.y, other.y)
    # The validation images are not in the training split (Fashion-MNIST has a handful of duplicate
    # images, so allow a few; overlapping splits would give thousands).
    train_keys = {img.tobytes() for img in train.x}
    assert sum(img.tobytes() in train_keys for img in val.x) < 20
    # Normalized with the training statistics: mean ~0, std ~1 over the training split.
    assert abs(float(train.x.mean())) < 0.01 and abs(float(train.x.std()) - 1) < 0.01


def test_npz_one_set(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 4, size=50).astype(np.int64)
    np.savez(tmp_path / "d.npz", x=x, y=y, class_names=np.array(["a", "b", "c", "d"]))
    spec = f"npz:{tmp_path / 'd.npz'}"
    train = load_dataset(spec, "train", val_size=10)
    val = load_dataset(spec, "val", val_size=10)
    test = load_dataset(spec, "test")
    assert (len(train), len(val), len(test)) == (40, 10, 50)
    assert not test.separate_test and train.class_names == ["a", "b", "c", "d"]
    assert train.normalization is None
    np.testing.assert_array_equal(np.sort(np.concatenate([train.y, val.y])), np.sort(y))


def test_default_validation_size_scales_with_the_data(tmp_path):
    from dgate_export.data import DEFAULT_VAL_SIZE, default_val_size

    assert [default_val_size(n) for n in (5, 50, 512, 60000, 10**6)] == [1, 5, 51, 5000, DEFAULT_VAL_SIZE]
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(50, 1, 4, 4)).astype(np.float32),
             y=rng.integers(0, 3, size=50).astype(np.int64))
    train = load_dataset(f"npz:{tmp_path / 'd.npz'}", "train", val_size=None)
    val = load_dataset(f"npz:{tmp_path / 'd.npz'}", "val", val_size=None)
    assert (len(train), len(val), train.val_size, val.val_size) == (45, 5, 5, 5)
    assert load_dataset(f"npz:{tmp_path / 'd.npz'}", "test").val_size is None


def test_npz_split_arrays(tmp_path):
    rng = np.random.default_rng(0)

    def pair(n):
        return rng.normal(size=(n, 1, 4, 4)).astype(np.float32), rng.integers(0, 3, size=n).astype(np.int64)

    (xt, yt), (xv, yv), (xs, ys) = pair(20), pair(6), pair(9)
    np.savez(tmp_path / "d.npz", x_train=xt, y_train=yt, x_val=xv, y_val=yv, x_test=xs, y_test=ys)
    spec = f"npz:{tmp_path / 'd.npz'}"
    np.testing.assert_array_equal(load_dataset(spec, "train").x, xt)
    np.testing.assert_array_equal(load_dataset(spec, "val").y, yv)
    test = load_dataset(spec, "test")
    np.testing.assert_array_equal(test.x, xs)
    assert test.separate_test


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((5, 8, 8), np.float32), "y": np.zeros(5, np.int64)}, "4 dimensions"),
        ({"x": np.zeros((5, 1, 8, 8), np.float64), "y": np.zeros(5, np.int64)}, "float32"),
        ({"x": np.zeros((5, 1, 8, 8), np.float32), "y": np.zeros(4, np.int64)}, "expected \\[N\\]"),
        ({"x": np.zeros((5, 1, 8, 8), np.float32), "y": np.zeros(5, np.int32)}, "int64"),
        ({"images": np.zeros((5, 1, 8, 8), np.float32)}, "expected `x` and `y`"),
    ],
)
def test_npz_bad_arrays_are_user_errors(tmp_path, arrays, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(UserError, match=message):
        load_dataset(f"npz:{tmp_path / 'd.npz'}", "test")


def test_npz_missing_file_and_unknown_spec(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}", "test")
    with pytest.raises(UserError, match="Unknown data set"):
        load_dataset("cifar-11", "test")
    with pytest.raises(UserError, match="Unknown split"):
        load_dataset("fashion-mnist", "holdout")


def test_repeat_channels_and_shape_check(tmp_path):
    x = np.random.default_rng(0).normal(size=(6, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(6, np.int64))
    spec = f"npz:{tmp_path / 'd.npz'}"
    gray = load_dataset(spec, "test")
    with pytest.raises(UserError, match="--repeat-channels"):
        check_input_shape(gray.x, (3, 8, 8))
    rgb = load_dataset(spec, "test", channels=3)
    check_input_shape(rgb.x, (3, 8, 8))
    np.testing.assert_array_equal(rgb.x[:, 2], x[:, 0])
    with pytest.raises(UserError, match="resize"):
        check_input_shape(gray.x, (1, 28, 28))
    assert load_dataset(spec, "test", channels=1).x.shape == (6, 1, 8, 8)
    np.savez(tmp_path / "rgb.npz", x=np.zeros((2, 3, 4, 4), np.float32), y=np.zeros(2, np.int64))
    with pytest.raises(UserError, match="cannot make 2"):
        load_dataset(f"npz:{tmp_path / 'rgb.npz'}", "test", channels=2)


@needs_fmnist
def test_repeat_channels_repeats_normalization():
    data = load_dataset("fashion-mnist", "test", channels=3)
    assert data.x.shape == (10000, 3, 28, 28)
    assert len(data.normalization["mean"]) == 3 and len(data.normalization["std"]) == 3


def test_npz_with_nan_or_inf_is_refused_naming_the_rows(tmp_path):
    x = np.zeros((20, 1, 4, 4), np.float32)
    x[3, 0, 1, 2] = np.nan
    x[7, 0, 0, 0] = np.inf
    x[12, 0, 3, 3] = -np.inf
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(20, np.int64))
    for split in ("train", "test"):
        with pytest.raises(UserError, match=r"NaN or inf values in 3 row\(s\) \(rows 3, 7, 12\)"):
            load_dataset(f"npz:{tmp_path / 'd.npz'}", split, val_size=5)
    huge = np.full((4, 1, 2, 2), 3e38, np.float32)  # finite values whose sum overflows are fine
    np.savez(tmp_path / "h.npz", x=huge, y=np.zeros(4, np.int64))
    assert len(load_dataset(f"npz:{tmp_path / 'h.npz'}", "test")) == 4


def test_dataset_batches_cover_the_rows_in_order_or_as_asked():
    """Dataset is the in-memory implementation of data.Rows: every row once, in order, or the rows asked."""
    x = np.arange(7 * 4, dtype=np.float32).reshape(7, 1, 2, 2)
    ds = Dataset(x, np.arange(7, dtype=np.int64), None, None)
    got = list(ds.batches(3))
    assert [len(b[0]) for b in got] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in got]), x)
    picked = list(ds.batches(2, rows=np.array([6, 0, 3])))
    assert [b[1].tolist() for b in picked] == [[6, 0], [3]]
    np.testing.assert_array_equal(picked[0][0], x[[6, 0]])
    assert ds.sample_shape == (1, 2, 2) and ds.labels() is ds.y
