"""Data sets for gating, calibration and benchmarks (numpy only; no torch import).

`load_dataset(spec, split)` returns a `Dataset` with normalized float32 images `x` [N, C, H, W] and int64
labels `y` [N]. Specs:

- `fashion-mnist`: the original IDX files (gzip) as installed by Debian's `dataset-fashion-mnist`
  (default folder /usr/share/datasets/fashion-mnist, or `data_dir`). Pixels are scaled to [0, 1] and
  normalized with the mean and std of all 60 000 training images (computed once, see `_FMNIST_MEAN`).
- `npz:PATH`: a NumPy archive holding either one set (`x`, `y`) or per-split arrays (`x_train`, `y_train`,
  `x_test`, `y_test`, optionally `x_val`, `y_val`). `x` is float32 [N, C, H, W], already normalized as the
  model expects; `y` is int64 [N]. Optional `class_names` (array of str).

Splits: "train" is the training set minus a seeded validation split of `val_size` rows (None: 10% of the
training rows, at most DEFAULT_VAL_SIZE; `Dataset.val_size` says what was used), "val" is that
split, "test" the held-out test set. The validation split is what calibration uses; test is never seen
by training or calibration. A one-set npz has no held-out test set: its "test" split is the whole file
(what `bench` measures on) and `Dataset.separate_test` is False so that callers can say so.
"""

from __future__ import annotations

import functools
import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import UserError

SPLITS = ("train", "val", "test")
DEFAULT_VAL_SIZE = 5000  # rows of the seeded validation split cut out of a training set (at most)
DEFAULT_VAL_FRACTION = 0.1  # of the training rows, when no validation size is given
DEFAULT_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
# Mean and std of all 60 000 Fashion-MNIST training images, pixels scaled to [0, 1]. Computed once with
# float64 over the Debian package's train-images-idx3-ubyte.gz; fixed constants keep the normalization
# identical between gate, build and bench whatever validation split is drawn.
_FMNIST_MEAN = 0.2860406
_FMNIST_STD = 0.3530242
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}  # IDX type codes


class Rows(Protocol):
    """What every consumer of data reads (training, calibration, quantization, bench, profile, score):
    rows of one split, in batches, so memory does not grow with the number of rows. `Dataset` (arrays
    in memory or memory-mapped) is one implementation; image folders and torch datasets are others.

    batches(batch_size, rows): x float32 [n, C, H, W] as the model takes it (normalized) and y int64
    [n] (None: unlabelled), for the row indices `rows` in that order (None: all rows in order).
    labels(): every row's label, int64 [N] (small: 8 bytes a row), or None when unlabelled.
    """

    class_names: list[str] | None
    normalization: dict | None  # the manifest's input.normalization (None: rows are model input as they are)

    def __len__(self) -> int: ...

    @property
    def sample_shape(self) -> tuple[int, ...]: ...  # (C, H, W) as the model sees it

    def labels(self) -> np.ndarray | None: ...

    def batches(self, batch_size: int, rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        ...


@dataclass
class Dataset:
    """Normalized images and labels of one split."""

    x: np.ndarray                      # float32 [N, C, H, W], normalized
    y: np.ndarray                      # int64 [N]
    class_names: list[str] | None
    normalization: dict | None         # {"scale", "mean", "std"} as in the manifest, or None
    spec: str = ""
    split: str = ""
    separate_test: bool = True         # False when "test" is the same data that train/val come from
    val_size: int | None = None        # rows of the validation split cut out of the training set (None: none cut)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def num_classes(self) -> int:
        if self.class_names is not None:
            return len(self.class_names)
        return int(self.y.max()) + 1 if len(self) else 0

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x.shape[1:])

    def labels(self) -> np.ndarray | None:
        return self.y

    def batches(self, batch_size: int, rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """The rows (all, or the indices `rows` in that order) in batches of at most `batch_size` (Rows)."""
        n = len(self) if rows is None else len(rows)
        for start in range(0, n, batch_size):
            pick = slice(start, start + batch_size) if rows is None else rows[start:start + batch_size]
            yield np.ascontiguousarray(self.x[pick], dtype=np.float32), self.y[pick]

    def subset(self, n: int, seed: int = 0) -> Dataset:
        """A seeded random subset of `n` rows (all rows when n >= len)."""
        if n >= len(self):
            return self
        rows = np.sort(np.random.default_rng(seed).permutation(len(self))[:n])
        return Dataset(self.x[rows], self.y[rows], self.class_names, self.normalization,
                       self.spec, self.split, self.separate_test)


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed): magic 0 0 TYPE NDIM, NDIM big-endian sizes, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise UserError(f"Cannot read the IDX file {path}: {err}.",
                        "Reinstall the data set or check the file.") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise UserError(f"{path} is not an IDX file (bad magic number).",
                        "Point --data-dir at the original gzip IDX files.")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    data = np.frombuffer(raw, dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise UserError(f"{path} is truncated: header says {dims}, found {data.size} values.",
                        "Reinstall the data set.")
    return data.reshape(dims)


def _fashion_mnist(part: str, data_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
    folder = Path(data_dir) if data_dir is not None else DEFAULT_FMNIST_DIR
    images, labels = _read_fashion_mnist(folder, part)
    x = (images.astype(np.float32) / 255.0 - _FMNIST_MEAN) / _FMNIST_STD
    return x[:, None, :, :].astype(np.float32), labels.astype(np.int64)


@functools.lru_cache(maxsize=4)
def _read_fashion_mnist(folder: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    # Cached: gate reads the training file twice (train and val splits); decompressing takes ~1 s.
    images_name, labels_name = _FMNIST_FILES[part]
    missing = [n for n in (images_name, labels_name) if not (folder / n).is_file()]
    if missing:
        raise UserError(
            f"Fashion-MNIST files not found in {folder} (missing {', '.join(missing)}).",
            "Install them with `apt-get install dataset-fashion-mnist`, or pass --data-dir with the folder "
            "holding the four *-idx?-ubyte.gz files.",
        )
    images = read_idx(folder / images_name)
    labels = read_idx(folder / labels_name)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise UserError(f"Unexpected Fashion-MNIST shapes in {folder}: images {images.shape}, "
                        f"labels {labels.shape}.", "Reinstall the data set.")
    return images, labels


def _check_arrays(x: np.ndarray, y: np.ndarray, where: str) -> None:
    if x.ndim != 4:
        raise UserError(f"{where}: x has shape {x.shape}; expected 4 dimensions [N, C, H, W].",
                        "Add the channel axis (x[:, None] for grayscale) and save again.")
    if x.dtype != np.float32:
        raise UserError(f"{where}: x has dtype {x.dtype}; expected float32, normalized as the model expects.",
                        "Convert with x.astype(np.float32) after normalizing.")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise UserError(f"{where}: y has shape {y.shape}; expected [N] with N = {x.shape[0]} (rows of x).",
                        "Save one integer label per image.")
    if y.dtype != np.int64:
        raise UserError(f"{where}: y has dtype {y.dtype}; expected int64 class indices.",
                        "Convert with y.astype(np.int64).")
    if y.size and y.min() < 0:
        raise UserError(f"{where}: y holds negative labels.", "Labels must be class indices 0..classes-1.")
    check_finite(x, where)


def check_finite(x: np.ndarray, where: str) -> None:
    """Refuse images holding NaN or inf, naming the first rows (gate would train on them and write
    NaN weights and thresholds)."""
    if np.isfinite(x.sum(dtype=np.float64)):  # one reduction: finite values cannot sum to NaN or inf
        return
    bad = np.nonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))[0]
    shown = ", ".join(str(int(i)) for i in bad[:10]) + (", ..." if len(bad) > 10 else "")
    raise UserError(f"{where}: x holds NaN or inf values in {len(bad)} row(s) (rows {shown}).",
                    "Remove or repair those rows and save the file again.")


def _load_npz(path_text: str, split: str, *, val_size: int | None,
              seed: int) -> tuple[np.ndarray, np.ndarray, list[str] | None, bool, int | None]:
    """(x, y, class_names, separate_test, validation rows cut) of `split` of an npz file (module docstring)."""
    path = Path(path_text)
    if not path_text or not path.is_file():
        raise UserError(f"--data npz:{path_text}: no such file.", "Give the path of an existing .npz file.")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UserError(f"Cannot read {path} as a NumPy .npz archive: {err}.",
                        "Save it with np.savez(path, x=..., y=...).") from err
    with archive:
        keys = set(archive.files)
        names = [str(n) for n in archive["class_names"]] if "class_names" in keys else None

        def pair(suffix: str) -> tuple[np.ndarray, np.ndarray]:
            x, y = archive["x" + suffix], archive["y" + suffix]
            _check_arrays(x, y, f"{path} (x{suffix}, y{suffix})")
            return x, y

        if {"x", "y"} <= keys:
            # One set: train/val are a seeded partition of it, "test" is all of it (for bench).
            x, y = pair("")
            if split == "test":
                return x, y, names, False, None
            x, y, cut = _split(x, y, split, val_size=val_size, seed=seed, where=str(path))
            return x, y, names, False, cut
        if not {"x_train", "y_train"} <= keys:
            raise UserError(f"{path} holds arrays {sorted(keys)}; expected `x` and `y`, or `x_train`, "
                            "`y_train`, `x_test`, `y_test` (optionally `x_val`, `y_val`).",
                            "Save it with np.savez(path, x=images, y=labels).")
        if split == "test":
            if not {"x_test", "y_test"} <= keys:
                raise UserError(f"{path} has x_train but no x_test / y_test arrays.",
                                "Add the held-out test set as x_test and y_test.")
            x, y = pair("_test")
        elif {"x_val", "y_val"} <= keys:
            x, y = pair("_" + split)
        else:
            x, y = pair("_train")
            x, y, cut = _split(x, y, split, val_size=val_size, seed=seed, where=str(path))
            return x, y, names, True, cut
        return x, y, names, True, None


def _repeat_channels(x: np.ndarray, normalization: dict | None, channels: int | None, where: str):
    if channels is None or channels == x.shape[1]:
        return x, normalization
    if x.shape[1] == 1 and channels > 1:
        x = np.repeat(x, channels, axis=1)
        if normalization is not None:
            normalization = dict(normalization, mean=normalization["mean"] * channels,
                                 std=normalization["std"] * channels)
        return x, normalization
    raise UserError(f"{where}: the data has {x.shape[1]} channels; cannot make {channels} from it.",
                    "Only 1-channel data can be repeated to more channels; convert the data yourself.")


def load_dataset(spec: str, split: str, *, data_dir: str | Path | None = None, channels: int | None = None,
                 val_size: int | None = DEFAULT_VAL_SIZE, seed: int = 0) -> Dataset:
    """Load split "train", "val" or "test" of data set `spec` (see the module docstring); `val_size` None:
    the default for the data's size (default_val_size)."""
    if split not in SPLITS:
        raise UserError(f"Unknown split {split!r}.", f"Choose one of: {', '.join(SPLITS)}.")
    normalization: dict | None
    cut: int | None = None
    if spec == "fashion-mnist":
        x, y = _fashion_mnist("test" if split == "test" else "train", Path(data_dir) if data_dir else None)
        if split != "test":
            x, y, cut = _split(x, y, split, val_size=val_size, seed=seed, where=spec)
        names: list[str] | None = list(FMNIST_CLASSES)
        normalization = {"scale": 1.0 / 255.0, "mean": [_FMNIST_MEAN], "std": [_FMNIST_STD]}
        separate_test = True
    elif spec.startswith("npz:"):
        x, y, names, separate_test, cut = _load_npz(spec[4:], split, val_size=val_size, seed=seed)
        normalization = None
    else:
        raise UserError(f"Unknown data set {spec!r}.",
                        "Use `fashion-mnist` or `npz:PATH` (arrays x float32 [N,C,H,W] and y int64 [N]).")
    x, normalization = _repeat_channels(x, normalization, channels, spec)
    return Dataset(np.ascontiguousarray(x), y, names, normalization, spec, split, separate_test, cut)


def load_splits(spec: str, *, data_dir: str | Path | None = None, channels: int | None = None,
                val_size: int | None = DEFAULT_VAL_SIZE, seed: int = 0) -> dict[str, Dataset]:
    """All three splits of `spec` ("train", "val", "test"), cut with the same validation split."""
    return {s: load_dataset(spec, s, data_dir=data_dir, channels=channels, val_size=val_size, seed=seed)
            for s in SPLITS}


def recorded_split(data_split: dict | None, where: str, val_size: int | None = None,
                   seed: int | None = None) -> tuple[int, int]:
    """The validation split (val_size, seed) to calibrate on: the one a gated model or a bundle records
    (`data_split`; a different one given is refused: its rows may include ones the gates trained on),
    else the given values or gate's defaults (checkpoints written before the split was recorded)."""
    recorded = data_split or {}
    chosen: dict[str, int | None] = {"val_size": val_size, "seed": seed}
    for key, value in chosen.items():
        if value is None:
            chosen[key] = recorded.get(key, DEFAULT_VAL_SIZE if key == "val_size" else 0)
        elif key in recorded and value != recorded[key]:
            flag = "--" + key.replace("_", "-")
            raise UserError(
                f"{where} was gated with the validation split {recorded.get('val_size')} rows, seed "
                f"{recorded.get('seed')}; {flag} {value} would choose thresholds on other rows, some of which "
                "the gates were trained on.",
                f"Leave out {flag}: calibrate uses the recorded split.")
    return int(chosen["val_size"] or 0), int(chosen["seed"] or 0)


class SplitTooLarge(UserError):
    """A validation split that leaves no training row. No option is named: calibrate and build use the
    split a model records, and only gate (which catches this) takes --val-size."""

    def __init__(self, where: str, val_size: int, rows: int):
        super().__init__(f"{where}: a validation split of {val_size} rows does not fit its {rows} training rows "
                         "(the split must leave at least one row for training).",
                         "Use data with more training rows.")
        self.val_size, self.rows = val_size, rows


def default_val_size(training_rows: int) -> int:
    """The validation split for a training set of this many rows: 10%, at most DEFAULT_VAL_SIZE, at least 1."""
    return max(1, min(DEFAULT_VAL_SIZE, int(training_rows * DEFAULT_VAL_FRACTION)))


def _split(x: np.ndarray, y: np.ndarray, split: str, *, val_size: int | None, seed: int,
           where: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Cut "train" or "val" out of a training set: a seeded random split of `val_size` rows (None: the
    default for its size). Returns (x, y, validation rows)."""
    n = y.shape[0]
    if val_size is None:
        val_size = default_val_size(n)
    if not 0 < val_size < n:
        raise SplitTooLarge(where, val_size, n)
    # A fixed seeded permutation: the same seed gives the same validation rows in gate and calibrate.
    order = np.random.default_rng(seed).permutation(n)
    rows = np.sort(order[:val_size] if split == "val" else order[val_size:])
    return x[rows], y[rows], val_size


def check_input_shape(x: np.ndarray, expected_chw: tuple[int, int, int] | list[int], *,
                      where: str = "the data") -> None:
    """Refuse data whose per-sample shape is not the model's (C, H, W), with the fix when one exists."""
    expected = tuple(int(d) for d in expected_chw)
    got = tuple(int(d) for d in x.shape[1:])
    if got == expected:
        return
    if len(got) == 3 and got[0] == 1 and expected[0] == 3 and got[1:] == expected[1:]:
        raise UserError(
            f"The model expects 3-channel input {expected} but {where} has 1 channel {got}.",
            "Repeat the gray channel: pass --repeat-channels (or channels=3 to load_dataset).",
        )
    hint = "Use data of the model's input shape"
    if len(got) == 3 and len(expected) == 3 and got[0] == expected[0] and got[1:] != expected[1:]:
        hint += f" (resize the images to {expected[1]}x{expected[2]}, or build the model for {got[1]}x{got[2]})"
    raise UserError(f"The model expects input of shape {expected} per sample; {where} has {got}.", hint + ".")


def check_labels(y: np.ndarray | None, num_classes: int, where: str = "The labels") -> None:
    """Refuse labels outside 0..num_classes-1 (the classes of the model or bundle), naming the first."""
    if y is None or not len(y):
        return
    bad = np.nonzero((y < 0) | (y >= num_classes))[0]
    if len(bad):
        raise UserError(f"{where} hold {len(bad)} value(s) outside 0..{num_classes - 1}, the classes of this model "
                        f"(row {int(bad[0])}: label {int(y[bad[0]])}).",
                        "Use data labelled for this model's classes.")


def data_file(spec: str | None) -> str | None:
    """The file a data spec reads (npz:PATH), None for the built-in sets: an input no output may replace."""
    return spec[4:] if spec and spec.startswith("npz:") else None


def load_images(spec: str, *, data_dir: str | Path | None = None, channels: int | None = None,
                split: str = "test", data_split: dict | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows to classify (`score`): (x, labels or None). An npz holding `x` without `y` gives unlabelled
    images, float32 model input or integer raw pixels (which the runtime normalizes with the bundle's
    input.normalization), and has no splits; anything else is `load_dataset(spec, split)` ("test": the
    split `bench` measures), the validation split cut as `data_split` records (a bundle's: the rows its
    thresholds were calibrated on)."""
    if split not in SPLITS:
        raise UserError(f"Unknown split {split!r}.", f"Choose one of: {', '.join(SPLITS)}.")
    if spec.startswith("npz:") and Path(spec[4:]).is_file():
        try:
            with np.load(spec[4:], allow_pickle=False) as archive:
                keys = set(archive.files)
                x = archive["x"] if "x" in keys and "y" not in keys else None
        except (OSError, ValueError) as err:
            raise UserError(f"Cannot read {spec[4:]} as a NumPy .npz archive: {err}.",
                            "Save it with np.savez(path, x=...).") from err
        if x is not None:
            if x.ndim != 4 or x.dtype.kind not in "fiu":
                raise UserError(f"{spec[4:]}: x has shape {x.shape} and dtype {x.dtype}; expected [N, C, H, W] "
                                "float32 model input or integer raw pixels.", "Save the images in NCHW layout.")
            if split != "test":
                raise UserError(f"{spec[4:]} holds only x (no labels, no splits): --split {split} does not apply.",
                                "Leave out --split to score every row.")
            x, _ = _repeat_channels(x, None, channels, spec)
            return np.ascontiguousarray(x), None
    val_size, seed = recorded_split(data_split, spec)
    ds = load_dataset(spec, split, data_dir=data_dir, channels=channels, val_size=val_size, seed=seed)
    return ds.x, ds.y
