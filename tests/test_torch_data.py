"""compile.torch_data: torch Datasets, DataLoaders, iterables and arrays as data.Rows, and their refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dgate_export.compile.torch_data import IterableRows, TorchDatasetRows, as_rows
from dgate_export.data import Dataset
from dgate_export.errors import UserError

N = 10


def _xy(n: int = N):
    x = torch.arange(n * 1 * 2 * 2, dtype=torch.float32).reshape(n, 1, 2, 2)
    return x, torch.arange(n) % 3


class Items(torch.utils.data.Dataset):
    """Map-style, labels only from the items (no `targets`), images decoded on access (counted)."""

    def __init__(self, n: int = N):
        self.classes = ["a", "b", "c"]
        self.x, self.y = _xy(n)
        self.reads = 0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i], int(self.y[i])


def _all(rows, batch_size=4, order=None):
    parts = list(rows.batches(batch_size, order))
    assert all(len(x) <= batch_size for x, _ in parts)
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def test_torch_dataset_has_random_access():
    data = Items()
    rows = as_rows(data)
    assert isinstance(rows, TorchDatasetRows) and len(rows) == N and rows.sample_shape == (1, 2, 2)
    assert rows.class_names == ["a", "b", "c"] and rows.normalization is None
    x, y = _all(rows)
    assert x.dtype == np.float32 and np.array_equal(x, data.x.numpy()) and np.array_equal(y, data.y.numpy())
    order = np.array([7, 2, 9])
    x, y = _all(rows, 2, order)
    assert np.array_equal(x, data.x.numpy()[order]) and np.array_equal(y, data.y.numpy()[order])
    assert np.array_equal(rows.labels(), data.y.numpy())


def test_torch_dataset_labels_from_targets_or_a_pass_without_reading_images_again():
    data = Items()
    data.targets = data.y.tolist()
    rows = as_rows(data)
    reads = data.reads
    assert np.array_equal(rows.labels(), data.y.numpy()) and data.reads == reads
    plain = Items()
    rows = as_rows(plain)
    _all(rows)  # a pass over every row in order, as gate training's feature cache reads
    assert plain.reads == N and np.array_equal(rows.labels(), plain.y.numpy()) and plain.reads == N


def test_torch_dataset_read_in_worker_processes():
    data = Items()
    x, y = _all(as_rows(data, num_workers=2), 3, np.array([9, 0, 4, 5]))
    assert np.array_equal(x, data.x.numpy()[[9, 0, 4, 5]]) and np.array_equal(y, data.y.numpy()[[9, 0, 4, 5]])


def test_dataloader_is_read_in_one_pass_per_call():
    x, y = _xy()
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    rows = as_rows(loader)
    assert isinstance(rows, IterableRows) and len(rows) == N and rows.sample_shape == (1, 2, 2)
    got_x, got_y = _all(rows, 3)
    assert sorted(got_y.tolist()) == sorted(y.tolist()) and not np.array_equal(got_x, x.numpy())  # its own order
    labels = np.array([int(v) for v in got_x[:, 0, 0, 0] // 4 % 3])  # each image carries its label
    assert np.array_equal(labels, got_y)
    assert np.array_equal(rows.labels(), got_y)  # the labels of the pass just read, in its order
    assert len(list(rows.batches(100))) == 3  # a loader can be read again (its own batches)
    shuffled = as_rows(DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True))
    with pytest.raises(UserError, match="shuffles its rows on every pass"):
        shuffled.labels()  # before any pass: the labels of a pass of their own would not match the next pass
    ordered = as_rows(DataLoader(TensorDataset(x, y), batch_size=4))
    assert np.array_equal(ordered.labels(), y.numpy())


def test_dataloader_refuses_random_access_with_the_fix():
    x, y = _xy()
    rows = as_rows(DataLoader(TensorDataset(x, y), batch_size=4))
    got_x, got_y = _all(rows, 3, np.array([0, 1, 5, 9]))  # rows in increasing order: one pass
    assert np.array_equal(got_x, x.numpy()[[0, 1, 5, 9]]) and np.array_equal(got_y, y.numpy()[[0, 1, 5, 9]])
    for order in (np.array([2, 1]), np.array([1, 1])):
        with pytest.raises(UserError) as err:
            next(rows.batches(4, order))
        assert "one pass" in err.value.message and "Pass the validation data separately" in err.value.hint
    shuffled = as_rows(DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True))
    with pytest.raises(UserError, match="cannot give chosen rows"):
        next(shuffled.batches(4, np.array([0, 1])))  # which rows those are changes from pass to pass
    with pytest.raises(UserError, match="row 10 was asked for"):
        list(rows.batches(4, np.array([3, 10])))


def test_one_shot_iterator_reads_once():
    x, y = _xy()
    rows = as_rows((x[i:i + 3], y[i:i + 3]) for i in range(0, N, 3))
    assert rows.sample_shape == (1, 2, 2)  # peeks at the first batch, which the pass still gives
    with pytest.raises(TypeError, match="not known before it is read"):
        len(rows)
    with pytest.raises(UserError, match="labels of a one-pass iterator"):
        rows.labels()
    got_x, got_y = _all(rows, 2)
    assert np.array_equal(got_x, x.numpy()) and np.array_equal(got_y, y.numpy()) and len(rows) == N
    with pytest.raises(UserError, match="already read once"):
        next(rows.batches(2))


def test_list_of_batches_and_arrays():
    x, y = _xy()
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    rows = as_rows(batches)
    assert len(rows) == N and np.array_equal(_all(rows)[1], y.numpy())
    arrays = as_rows((x.numpy(), y.numpy()), class_names=["a", "b", "c"])
    assert isinstance(arrays, Dataset) and len(arrays) == N and arrays.class_names == ["a", "b", "c"]
    assert as_rows(arrays) is arrays  # Rows pass through


def test_unlabelled_loader_has_no_labels():
    x, _ = _xy()
    rows = as_rows(DataLoader(TensorDataset(x), batch_size=4))
    assert all(y is None for _, y in rows.batches(4)) and rows.labels() is None


class PILLike:
    pass


@pytest.mark.parametrize("data, message", [
    ("fashion-mnist", "the data set spec 'fashion-mnist' is not accepted here"),
    (42, "is a int, which is not rows of data"),
    ((torch.zeros(4, 2, 2), torch.zeros(4, dtype=torch.int64)), "expected [N, C, H, W]"),
    ((torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64)), "dtype uint8"),
    ((torch.zeros(4, 1, 2, 2), torch.zeros(3, dtype=torch.int64)), "x has 4 rows but y has 3 labels"),
    ((torch.zeros(4, 1, 2, 2), torch.full((4,), -1)), "negative labels"),
    ((torch.zeros(4, 1, 2, 2), torch.zeros(4)), "expected class indices"),
])
def test_bad_data_is_refused(data, message):
    with pytest.raises(UserError) as err:
        as_rows(data)
    assert message in err.value.message


@pytest.mark.parametrize("item, message", [
    ((PILLike(), 1), "image is a test_torch_data.PILLike, not a tensor"),
    ({"image": torch.zeros(1, 2, 2), "label": 0}, "is a dict of 2 items; expected (image, label)"),
    ((torch.zeros(1, 2, 2), "cat"), "label is not a class index"),
])
def test_bad_dataset_items_are_refused(item, message):
    class Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return item

    with pytest.raises(UserError) as err:
        list(as_rows(Bad()).batches(2))
    assert message in err.value.message


def test_images_of_different_shapes_are_refused():
    data = [(torch.zeros(1, 2, 2), 0), (torch.zeros(1, 3, 3), 1)]
    with pytest.raises(UserError, match="different shapes"):
        list(as_rows(_ListDataset(data)).batches(2))
    with pytest.raises(UserError, match="different sample shapes"):
        list(as_rows([(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.int64)),
                      (torch.zeros(2, 1, 3, 3), torch.zeros(2, dtype=torch.int64))]).batches(2))


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_bench_reads_a_dataloader_in_order_and_refuses_one_that_shuffles(tmp_path):
    from tiny_bundle import CLASSES, SHAPE, make_tiny_bundle

    from dgate_export.compile import BenchOptions, bench_bundle

    bundle, _ = make_tiny_bundle(tmp_path / "b", max_batch=8)
    x = torch.randn(20, *SHAPE)
    y = torch.arange(20) % CLASSES
    options = BenchOptions(batch_sizes=(4,), warmup_ms=1, min_iterations=1, min_seconds=0.01)
    report = bench_bundle(bundle, DataLoader(TensorDataset(x, y), batch_size=6), options=options, progress=False)
    assert report["data"]["samples"] == 20 and report["accuracy"] is not None
    with pytest.raises(UserError, match="shuffles its rows on every pass"):
        bench_bundle(bundle, DataLoader(TensorDataset(x, y), batch_size=6, shuffle=True), options=options,
                     progress=False)
