"""A user's torch data as `data.Rows`: torch Datasets, DataLoaders, iterables of (x, y) batches, arrays.

`as_rows(data)` is what every function of the Python API calls on the data it is given:

- a `data.Rows` (a `data.Dataset` from `load_dataset`, image folders, ...): as it is;
- `(x, y)`: arrays or tensors in memory, x [N, C, H, W] float, y [N] class indices;
- a torch `Dataset` (map-style: `len` and `dataset[i]` -> (image tensor [C, H, W], label)):
  `TorchDatasetRows`, random access, read in batches (in `num_workers` processes when asked);
- a `DataLoader`, a torch `IterableDataset` or any iterable of (x, y) batches: `IterableRows`, read
  once per pass in its own order. That is all gate training (features cached in one pass) and
  calibration (exit logits collected in one pass) need, and bench (passes in order, its first rows).
  What needs random access (rows in another order: a seeded subset, epochs in a shuffled order; any
  chosen rows of a DataLoader that shuffles, such as a validation split) is refused with a UserError
  that says what to pass instead; a one-shot iterator (a generator) is refused a second pass.

Rows are model input as the model takes it: float32, already transformed and normalized by the user's
own transforms (`normalization` None, unless given: it is recorded in the checkpoint and the manifest
for runtimes that take raw pixels). Labels are int64 class indices, or None for unlabelled rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, RandomSampler

from ..data import Dataset, Rows
from ..errors import UserError

ROWS_HELP = ("Give a torch Dataset (items (image tensor [C, H, W], label)), a DataLoader or another iterable of "
             "(x, y) batches, arrays (x [N, C, H, W] float32, y [N] int64), or a data set spec "
             "(fashion-mnist, npz:PATH).")
RANDOM_ACCESS_HINT = ("A DataLoader or an iterable gives its rows once per pass, in its own order. Pass the "
                      "validation data separately (e.g. calibrate_gates(model, val_loader)), or give a torch "
                      "Dataset (random access) instead of a DataLoader.")


def is_rows(data: Any) -> bool:
    """Whether `data` already implements data.Rows."""
    return all(hasattr(data, a) for a in ("batches", "labels", "sample_shape"))


def as_rows(data: Any, *, what: str = "the data", class_names: list[str] | None = None,
            normalization: dict | None = None, num_workers: int = 0) -> Rows:
    """`data` (module docstring) as data.Rows; UserError for anything else. `what` names it in messages."""
    if is_rows(data):
        return data
    if isinstance(data, str):
        raise UserError(f"{what}: the data set spec {data!r} is not accepted here.", ROWS_HELP)
    if isinstance(data, tuple | list) and len(data) == 2 and all(_is_array(a) for a in data):
        return _arrays(data[0], data[1], what, class_names, normalization)
    if isinstance(data, DataLoader | IterableDataset):
        return IterableRows(data, what=what, class_names=class_names, normalization=normalization)
    if isinstance(data, torch.utils.data.Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")
                                                      and not isinstance(data, list | tuple | np.ndarray)):
        return TorchDatasetRows(data, what=what, class_names=class_names, normalization=normalization,
                                num_workers=num_workers)
    if isinstance(data, Iterable) and not isinstance(data, np.ndarray | torch.Tensor):
        return IterableRows(data, what=what, class_names=class_names, normalization=normalization)
    raise UserError(f"{what} is a {type(data).__name__}, which is not rows of data.", ROWS_HELP)


def _is_array(a: Any) -> bool:
    return isinstance(a, np.ndarray | torch.Tensor)


def _numpy(a: Any) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _arrays(x: Any, y: Any, what: str, class_names: list[str] | None, normalization: dict | None) -> Dataset:
    xs, ys = _images(_numpy(x), what, batch=True), _labels(_numpy(y), what)
    if len(ys) != len(xs):
        raise UserError(f"{what}: x has {len(xs)} rows but y has {len(ys)} labels.", "Give one label per image.")
    return Dataset(xs, ys, class_names, normalization, spec="arrays", split="")


def _images(x: np.ndarray, where: str, *, batch: bool) -> np.ndarray:
    """x as float32 model input ([N, C, H, W] when `batch`, else [C, H, W]); integers and odd ranks refused."""
    rank = 4 if batch else 3
    layout = "[N, C, H, W]" if batch else "[C, H, W]"
    if x.ndim != rank:
        raise UserError(f"{where}: images of shape {list(x.shape)}; expected {layout}.",
                        "Add the channel axis (x[:, None] for grayscale batches, x[None] for one image).")
    if not np.issubdtype(x.dtype, np.floating):
        raise UserError(f"{where}: images of dtype {x.dtype}; expected float model input (as the model takes it).",
                        "Convert and normalize them in the dataset's transform, e.g. torchvision.transforms."
                        "ToTensor() (and Normalize).")
    return np.ascontiguousarray(x, dtype=np.float32)


def _labels(y: np.ndarray, where: str) -> np.ndarray:
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool):
        raise UserError(f"{where}: labels of shape {list(y.shape)} and dtype {y.dtype}; expected class indices "
                        "[N] (integers).", "Give one integer label per row.")
    if y.size and int(y.min()) < 0:
        raise UserError(f"{where}: negative labels.", "Labels are class indices 0..classes-1.")
    return y.astype(np.int64)


def _split_item(item: Any, where: str) -> tuple[Any, Any]:
    """(x, y or None) of one dataset item or one loader batch."""
    if isinstance(item, tuple | list) and len(item) == 2:
        return item[0], item[1]
    if isinstance(item, tuple | list) and len(item) == 1:
        return item[0], None
    if _is_array(item):
        return item, None
    raise UserError(f"{where} is a {type(item).__name__}"
                    + (f" of {len(item)} items" if isinstance(item, tuple | list | dict) else "")
                    + "; expected (image, label) (or an image alone, unlabelled).",
                    "Wrap the dataset so that it returns (image tensor, label), e.g. a Dataset whose __getitem__ "
                    "returns (transform(image), label).")


def _collate(items: list[Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """A batch of dataset items as (x float32 [n, C, H, W], y int64 [n] or None). Module-level: DataLoader
    workers pickle it."""
    xs, ys = [], []
    for item in items:
        x, y = _split_item(item, "A dataset item")
        if not _is_array(x):
            raise UserError(f"A dataset item's image is a {type(x).__module__}.{type(x).__name__}, not a tensor.",
                            "Add a transform that makes a float tensor [C, H, W], e.g. torchvision.transforms."
                            "ToTensor() (and Normalize).")
        xs.append(_images(_numpy(x), "A dataset item", batch=False))
        ys.append(y)
    shapes = {a.shape for a in xs}
    if len(shapes) > 1:
        raise UserError(f"The dataset's images have different shapes: {sorted(shapes)}.",
                        "Resize them to one size in the dataset's transform.")
    labelled = [y is not None for y in ys]
    if any(labelled) and not all(labelled):
        raise UserError("Some dataset items have labels and some do not.", "Give every item a label, or none.")
    if not all(labelled):
        return np.stack(xs), None
    try:
        labels = np.array([int(_numpy(y).item()) if _is_array(y) else int(y) for y in ys])
    except (TypeError, ValueError) as err:
        raise UserError(f"A dataset item's label is not a class index ({err}).",
                        "Give integer class labels.") from err
    return np.stack(xs), _labels(labels, "The dataset's labels")


def _class_names(source: Any) -> list[str] | None:
    names = getattr(source, "classes", None)
    if isinstance(names, list | tuple) and names and all(isinstance(n, str) for n in names):
        return list(names)
    return None


class TorchDatasetRows:
    """A map-style torch Dataset as data.Rows (random access: any rows, any order)."""

    def __init__(self, dataset: Any, *, what: str = "the data", class_names: list[str] | None = None,
                 normalization: dict | None = None, num_workers: int = 0):
        self.dataset = dataset
        self.what = what
        self.class_names = class_names or _class_names(dataset)
        self.normalization = normalization
        self.num_workers = int(num_workers)
        self._labels: np.ndarray | None = None
        self._shape: tuple[int, ...] | None = None
        if len(self) == 0:
            raise UserError(f"{what} is an empty dataset.", "Give a dataset with rows.")

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        if self._shape is None:
            x, _ = _collate([self.dataset[0]])
            self._shape = tuple(int(d) for d in x.shape[1:])
        return self._shape

    def labels(self) -> np.ndarray | None:
        """`dataset.targets` when it holds one label per row (torchvision's data sets), else one pass over the
        items (their images are decoded too), kept."""
        if self._labels is None:
            targets = getattr(self.dataset, "targets", None)
            if targets is not None and len(targets) == len(self):
                self._labels = _labels(_numpy(targets), f"{self.what} (targets)")
            else:
                parts = [y for _, y in self.batches(256)]
                if any(p is None for p in parts):
                    return None
                self._labels = np.concatenate([p for p in parts if p is not None])
        return self._labels

    def batches(self, batch_size: int, rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        order = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64)
        if self.num_workers > 0:
            batches: Iterable[tuple[np.ndarray, np.ndarray | None]] = DataLoader(
                torch.utils.data.Subset(self.dataset, order.tolist()), batch_size=batch_size, shuffle=False,
                num_workers=self.num_workers, collate_fn=_collate)
        else:
            batches = (_collate([self.dataset[int(i)] for i in order[start:start + batch_size]])
                       for start in range(0, len(order), batch_size))
        labels: list[np.ndarray | None] = []
        for x, y in batches:
            labels.append(y)
            yield x, y
        if rows is None and self._labels is None and labels and all(y is not None for y in labels):
            self._labels = np.concatenate(labels)  # type: ignore[arg-type]  # kept: labels() reads no image again


class IterableRows:
    """A DataLoader, IterableDataset or iterable of (x, y) batches as data.Rows, read one pass at a time.

    `batches(batch_size)` yields the source's batches in its order (split to at most batch_size rows);
    `batches(..., rows=...)` gives rows in increasing order in one pass and refuses any other order and
    a DataLoader that shuffles (random access). A source that is an iterator (a generator) can
    be read once: a second pass is refused. The labels and the number of rows are those of the pass last
    read (a DataLoader's number of rows is known before)."""

    def __init__(self, source: Iterable, *, what: str = "the data", class_names: list[str] | None = None,
                 normalization: dict | None = None):
        self.source = source
        self.what = what
        self.one_shot = isinstance(source, Iterator)
        self.class_names = class_names or _class_names(getattr(source, "dataset", source))
        self.normalization = normalization
        self._head: list[tuple[np.ndarray, np.ndarray | None]] = []  # a one-shot source's batch read ahead
        self._passes = 0
        self._rows: int | None = None
        self._labels: np.ndarray | None = None
        self._unlabelled = False
        self._shape: tuple[int, ...] | None = None

    def __len__(self) -> int:
        if self._rows is None:
            self._rows = self._known_rows()
        if self._rows is None:  # TypeError: what len() of an object without a length raises (consumers catch it)
            raise TypeError(f"{self.what}: the number of rows of an iterator is not known before it is read")
        return self._rows

    def _known_rows(self) -> int | None:
        if isinstance(self.source, DataLoader):
            try:
                n = len(self.source.dataset)  # type: ignore[arg-type]
            except TypeError:
                return None
            if self.source.drop_last and self.source.batch_size:
                n -= n % self.source.batch_size
            return n
        if isinstance(self.source, list | tuple):
            return sum(len(_numpy(_split_item(b, "a batch")[0])) for b in self.source)
        return None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        if self._shape is None:
            if self.one_shot:
                if not self._head and self._passes == 0:
                    self._head = [self._convert(next(iter(self.source), None))]
                first = self._head[0][0] if self._head else None
            else:
                first = self._convert(next(iter(self.source), None))[0]
            if first is None:
                raise UserError(f"{self.what} cannot tell its sample shape: it was already read.",
                                RANDOM_ACCESS_HINT)
            self._shape = tuple(int(d) for d in first.shape[1:])
        return self._shape

    def labels(self) -> np.ndarray | None:
        """The labels of the pass last read, in its order (read them after the pass whose rows they label).
        Before any pass a re-iterable source is read for them; a one-shot source (its one pass would be
        spent) and a DataLoader that shuffles (the next pass would not match) are refused."""
        if self._labels is None and not self._unlabelled:
            if self.one_shot:
                raise UserError(f"{self.what}: the labels of a one-pass iterator come with its rows and were not "
                                "read.", RANDOM_ACCESS_HINT)
            if isinstance(self.source, DataLoader) and isinstance(self.source.sampler, RandomSampler):
                raise UserError(f"{self.what} shuffles its rows on every pass: its labels cannot be read apart "
                                "from its images without mixing them up.",
                                "Give a DataLoader with shuffle=False (or the Dataset itself) for this step.")
            for _ in self.batches(1 << 30):
                pass
        return self._labels

    def _chosen(self, batch_size: int, rows: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """Rows `rows` (positions in a pass) read in one pass: only rows in increasing order of a source whose
        order holds from pass to pass (bench's first rows); anything else needs random access."""
        shuffles = isinstance(self.source, DataLoader) and isinstance(self.source.sampler, RandomSampler)
        if shuffles or (len(rows) > 1 and not bool(np.all(np.diff(rows) > 0))) or (len(rows) and rows[0] < 0):
            raise UserError(f"{self.what} cannot give chosen rows (a validation split, a subset, a shuffled "
                            "epoch): it is read in one pass, in its own order.", RANDOM_ACCESS_HINT)
        at, want = 0, 0  # rows of the pass seen so far; how many of `rows` were given
        for x, y in self.batches(1 << 30) if len(rows) else ():
            stop = int(np.searchsorted(rows, at + len(x)))  # rows[want:stop] lie in this batch
            if stop > want:
                px, py = _pick(x, y, rows[want:stop] - at)
                for start in range(0, len(px), batch_size):
                    yield px[start:start + batch_size], None if py is None else py[start:start + batch_size]
                want = stop
            at += len(x)
            if want == len(rows):
                break
        if want < len(rows):
            raise UserError(f"{self.what} has {at} rows; row {int(rows[want])} was asked for.")

    def _empty(self) -> UserError:
        return UserError(f"{self.what} is empty: it gave no batches"
                         + (" (an iterator that was read before gives none)." if self.one_shot else "."),
                         "Give data with rows; a DataLoader or a list of batches can be read again.")

    def _convert(self, batch: Any) -> tuple[np.ndarray, np.ndarray | None]:
        if batch is None:
            raise self._empty()
        x, y = _split_item(batch, f"A batch of {self.what}")
        if not _is_array(x):
            raise UserError(f"A batch of {self.what} holds a {type(x).__name__} of images, not a tensor.",
                            "Give batches (x tensor [N, C, H, W], y tensor [N]), as a DataLoader makes them.")
        xs = _images(_numpy(x), f"A batch of {self.what}", batch=True)
        ys = None if y is None else _labels(_numpy(y), f"A batch of {self.what}")
        if ys is not None and len(ys) != len(xs):
            raise UserError(f"A batch of {self.what} has {len(xs)} images but {len(ys)} labels.",
                            "Give one label per image.")
        return xs, ys

    def batches(self, batch_size: int, rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        if rows is not None:
            yield from self._chosen(batch_size, np.asarray(rows, dtype=np.int64))
            return
        if self.one_shot and self._passes > 0:
            raise UserError(f"{self.what} is an iterator and was already read once; this step needs another pass.",
                            "Give a DataLoader or a list of batches (they can be read again), or a torch Dataset.")
        self._passes += 1
        source = iter(self.source)
        head, self._head = self._head, []
        count, labels, unlabelled = 0, [], False
        for x, y in _chain(head, (self._convert(b) for b in source)):
            if self._shape is None:
                self._shape = tuple(int(d) for d in x.shape[1:])
            elif tuple(x.shape[1:]) != self._shape:
                raise UserError(f"{self.what}: batches of different sample shapes ({list(self._shape)} and "
                                f"{list(x.shape[1:])}).", "Resize the images to one size.")
            count += len(x)
            unlabelled = unlabelled or y is None
            if y is not None:
                labels.append(y)
            for start in range(0, len(x), batch_size):
                yield x[start:start + batch_size], None if y is None else y[start:start + batch_size]
        if count == 0:
            raise self._empty()
        self._rows = count
        self._unlabelled = unlabelled
        self._labels = None if unlabelled else np.concatenate(labels)


def _pick(x: np.ndarray, y: np.ndarray | None, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    return x[keep], None if y is None else y[keep]


def _chain(head: list, rest: Iterator) -> Iterator:
    yield from head
    yield from rest
