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


# ---------------------------------------------------------------------------- streaming (data.Rows)


def _pixels(n: int, c: int = 3, size: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, c, size, size), dtype=np.uint8), rng.integers(0, 4, size=n).astype(np.int64)


def test_npz_members_are_memory_mapped_float32_and_uint8(tmp_path):
    from dgate_export.data import normalize_pixels, open_rows

    raw, y = _pixels(40)
    x = (raw.astype(np.float32) - 100) / 50
    np.savez(tmp_path / "f.npz", x=x, y=y)
    np.savez(tmp_path / "u.npz", x=raw, y=y)
    floats = open_rows(f"npz:{tmp_path / 'f.npz'}", "test")
    pixels = open_rows(f"npz:{tmp_path / 'u.npz'}", "test", normalization="0.5/0.25")
    for rows in (floats, pixels):
        assert isinstance(rows.x, np.memmap)  # read in place, not loaded
    assert floats.normalization is None and not floats.raw
    np.testing.assert_array_equal(np.concatenate([b[0] for b in floats.batches(16)]), x)
    norm = {"scale": 1 / 255, "mean": [0.5] * 3, "std": [0.25] * 3}
    assert pixels.normalization == norm and pixels.raw
    got = np.concatenate([b[0] for b in pixels.batches(16, rows=np.arange(39, -1, -1))])
    np.testing.assert_allclose(got, normalize_pixels(raw[::-1], norm), rtol=0, atol=1e-6)
    assert got.dtype == np.float32 and got.flags.writeable  # batches are the caller's own copies
    # the runtime's formula: (raw * scale - mean) / std
    np.testing.assert_allclose(got[0], (raw[39] / 255 - 0.5) / 0.25, rtol=0, atol=1e-6)


def test_uint8_pixels_default_normalization_and_compressed_npz(tmp_path):
    from dgate_export.data import open_rows
    from dgate_export.images import IMAGENET_MEAN

    raw, y = _pixels(10)
    np.savez_compressed(tmp_path / "c.npz", x=raw, y=y)
    rows = open_rows(f"npz:{tmp_path / 'c.npz'}", "test")
    assert not isinstance(rows.x, np.memmap)  # a compressed member cannot be mapped: read whole
    assert rows.normalization["mean"] == IMAGENET_MEAN  # 3-channel pixels: ImageNet's by default
    gray, _ = _pixels(10, c=1)
    np.savez(tmp_path / "g.npz", x=gray, y=y)
    assert open_rows(f"npz:{tmp_path / 'g.npz'}", "test").normalization == {"scale": 1 / 255, "mean": [0.0],
                                                                           "std": [1.0]}
    three = open_rows(f"npz:{tmp_path / 'g.npz'}", "test", channels=3)
    assert three.sample_shape == (3, 6, 6) and next(three.batches(4))[0].shape == (4, 3, 6, 6)


def test_npy_folder_and_its_split(tmp_path):
    from dgate_export.data import open_rows, split_rows

    raw, y = _pixels(30, c=1)
    x = raw.astype(np.float32)
    np.save(tmp_path / "x_train.npy", x)
    np.save(tmp_path / "y_train.npy", y)
    np.save(tmp_path / "x_test.npy", x[:5])
    np.save(tmp_path / "y_test.npy", y[:5])
    train = open_rows(f"npy:{tmp_path}", "train", val_size=6, seed=3)
    val = open_rows(f"npy:{tmp_path}", "val", val_size=6, seed=3)
    test = open_rows(f"npy:{tmp_path}", "test")
    assert isinstance(train.x, np.memmap) and train.x is not None
    # the validation split is a set of row indices into the arrays, seeded
    np.testing.assert_array_equal(val.index, split_rows(30, "val", val_size=6, seed=3))
    assert sorted(np.concatenate([train.index, val.index]).tolist()) == list(range(30))
    np.testing.assert_array_equal(np.concatenate([b[0] for b in val.batches(4)]), x[val.index])
    np.testing.assert_array_equal(val.labels(), y[val.index])
    assert len(test) == 5 and test.separate_test
    # the same arrays in an npz: the same rows
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:5], y_test=y[:5])
    np.testing.assert_array_equal(open_rows(f"npz:{tmp_path / 'd.npz'}", "val", val_size=6, seed=3).index, val.index)
    with pytest.raises(UserError, match="no such folder"):
        open_rows(f"npy:{tmp_path / 'nope'}", "test")


@needs_fmnist
def test_fashion_mnist_rows_keep_uint8_and_normalize_per_batch():
    from dgate_export.data import _fashion_mnist, open_rows

    rows = open_rows("fashion-mnist", "val", val_size=5000)
    assert rows.x.dtype == np.uint8 and rows.x.base is not None  # the decompressed pixels, not a float copy
    x, y = _fashion_mnist("train", None)  # the float32 formula used before rows streamed
    picked = np.array([4999, 0, 17])
    got = next(rows.batches(3, picked))
    np.testing.assert_allclose(got[0], x[rows.index[picked]], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(got[1], y[rows.index[picked]])


def test_nan_rows_are_refused_as_they_are_read_naming_the_file_rows(tmp_path):
    from dgate_export.data import open_rows

    x = np.zeros((20, 1, 4, 4), np.float32)
    x[3, 0, 1, 2] = np.nan
    x[12, 0, 0, 0] = np.inf
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(20, np.int64))
    rows = open_rows(f"npz:{tmp_path / 'd.npz'}", "test")
    assert len(next(rows.batches(3))[0]) == 3  # rows 0-2 are fine
    with pytest.raises(UserError, match=r"1 row\(s\) \(rows 12\)"):
        list(rows.batches(2, rows=np.array([0, 12])))


def test_memory_mapped_rows_pickle_as_their_file(tmp_path):
    import pickle

    from dgate_export.data import open_rows

    raw, y = _pixels(500, size=16)
    np.savez(tmp_path / "u.npz", x=raw, y=y)
    rows = open_rows(f"npz:{tmp_path / 'u.npz'}", "train", val_size=50)
    blob = pickle.dumps(rows)
    assert len(blob) < raw.nbytes / 20  # the labels and indices, not the pixels
    again = pickle.loads(blob)
    np.testing.assert_array_equal(next(again.batches(7))[0], next(rows.batches(7))[0])
