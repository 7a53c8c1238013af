"""Data sets for gating, calibration, benchmarks and scoring (numpy only; no torch import).

Every consumer reads rows through `Rows` (below): batches of normalized float32 model input [n, C, H, W]
and int64 labels, for all rows or given row indices, so memory does not grow with the number of rows.
`open_rows(spec, split)` opens one split of a data set spec as Rows; `load_dataset` materializes one
into a `Dataset` (arrays in memory: small data, tests, scripts). Specs:

- `fashion-mnist`: the original IDX files (gzip) as installed by Debian's `dataset-fashion-mnist`
  (default folder /usr/share/datasets/fashion-mnist, or `data_dir`). Kept as uint8 pixels (47 MB for
  the 60 000 training images); each batch is scaled to [0, 1] and normalized with the mean and std of
  all 60 000 training images (computed once, see `_FMNIST_MEAN`).
- `npz:PATH`: a NumPy archive holding either one set (`x`, `y`) or per-split arrays (`x_train`, `y_train`,
  `x_test`, `y_test`, optionally `x_val`, `y_val`). `x` is [N, C, H, W], float32 model input (already
  normalized as the model expects) or uint8 raw pixels (normalized per batch, see `normalization`); `y`
  is int64 [N]. Optional `class_names` (array of str). Members saved uncompressed (`np.savez`) are
  memory-mapped in place (their offset inside the zip file); a compressed member (`np.savez_compressed`)
  cannot be, and is read into memory whole.
- `npy:DIR`: the same arrays as one .npy file each in a folder (x.npy, y.npy or x_train.npy, ...,
  class_names.npy), memory-mapped.
- `folder:PATH`: image files, one sub-folder per class (sorted folder names are the class indices), or
  train/ and test/ (optionally val/) trees of class folders; JPEG and PNG, decoded and prepared per
  batch (`images.ImagePrep`: colour mode, resize, centre crop; then the normalization), by a few threads
  (Pillow releases the GIL while it decodes). A folder of images without class folders is unlabelled
  (`score`). See `images.scan_folder` for what is refused.

Raw pixels (uint8 arrays, image files) are normalized as x = (raw * scale - mean[c]) / std[c] with
`normalization` (the manifest's input.normalization form): what the caller gives (a gated model's or
bundle's record, or the --normalize choice), else the source's own: Fashion-MNIST's constants, and
ImageNet's for other 3-channel pixels ([0, 1] scaling for 1-channel ones).

Splits: "train" is the training set minus a seeded validation split of `val_size` rows (None: 10% of the
training rows, at most DEFAULT_VAL_SIZE; `val_size` on the rows says what was used), "val" is that
split, "test" the held-out test set. A split is a set of row indices into the arrays or files, never a
copy. The validation split is what calibration uses; test is never seen by training or calibration. A
one-set npz (or folder) has no held-out test set: its "test" split is the whole set (what `bench`
measures on) and `separate_test` is False so that callers can say so.
"""

from __future__ import annotations

import copy
import functools
import gzip
import struct
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

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
    """Normalized images and labels of one split, in memory (data.Rows)."""

    raw = False  # rows are model input as they are
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


# ------------------------------------------------------------------------------------- array rows


def check_finite(x: np.ndarray, where: str, rows: np.ndarray | None = None) -> None:
    """Refuse images holding NaN or inf, naming the first rows (gate would train on them and write
    NaN weights and thresholds). `rows`: the row numbers of x's rows in the data (default 0..n-1)."""
    if np.isfinite(x.sum(dtype=np.float64)):  # one reduction: finite values cannot sum to NaN or inf
        return
    bad = np.nonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))[0]
    if rows is not None:
        bad = np.sort(np.asarray(rows)[bad])
    shown = ", ".join(str(int(i)) for i in bad[:10]) + (", ..." if len(bad) > 10 else "")
    raise UserError(f"{where}: x holds NaN or inf values in {len(bad)} row(s) (rows {shown}).",
                    "Remove or repair those rows and save the file again.")


def _normalizer(normalization: dict, channels: int) -> tuple[np.float32, np.ndarray, np.ndarray]:
    mean = np.asarray(normalization["mean"], dtype=np.float32)
    std = np.asarray(normalization["std"], dtype=np.float32)
    if mean.size not in (1, channels) or std.size not in (1, channels):
        raise UserError(f"The normalization has {mean.size} means and {std.size} stds for {channels} channels.",
                        "Give one value, or one per channel.")
    return np.float32(normalization["scale"]), mean.reshape(1, -1, 1, 1), std.reshape(1, -1, 1, 1)


def normalize_pixels(raw: np.ndarray, normalization: dict) -> np.ndarray:
    """uint8 pixels [n, C, H, W] -> float32 model input: (raw * scale - mean[c]) / std[c] (the runtime's formula)."""
    scale, mean, std = _normalizer(normalization, raw.shape[1])
    return ((raw.astype(np.float32) * scale - mean) / std).astype(np.float32, copy=False)


def _repeat(normalization: dict | None, channels: int) -> dict | None:
    if normalization is None or len(normalization["mean"]) == channels:
        return normalization
    return dict(normalization, mean=list(normalization["mean"]) * channels, std=list(normalization["std"]) * channels)


class ArrayRows:
    """Rows of arrays in memory or memory-mapped (data.Rows): `x` [N, C, H, W] float32 model input, or
    uint8 raw pixels normalized per batch with `normalization`; `y` int64 [N] labels or None. The split
    is `index`, the row numbers of x it holds (None: all rows). `channels`: 1-channel x repeated to this
    many channels per batch. Row numbers given to `batches` count within the split."""

    def __init__(self, x: np.ndarray, y: np.ndarray | None, *, index: np.ndarray | None = None,
                 class_names: list[str] | None = None, normalization: dict | None = None,
                 channels: int | None = None, spec: str = "", split: str = "", separate_test: bool = True,
                 val_size: int | None = None, where: str | None = None):
        self.x, self.y, self.index = x, y, index
        self.raw = x.dtype == np.uint8
        source_channels = int(x.shape[1])
        self.repeat = 1
        if channels is not None and channels != source_channels:
            if source_channels != 1:
                raise UserError(f"{where or spec}: the data has {source_channels} channels; cannot make {channels} "
                                "from it.",
                                "Only 1-channel data can be repeated to more channels; convert the data yourself.")
            self.repeat = channels
        # float32 rows are model input as they are: a normalization describes raw pixels only
        self.normalization = _repeat(normalization, source_channels * self.repeat) if self.raw else None
        if self.raw and self.normalization is None:
            raise UserError(f"{where or spec}: x holds uint8 raw pixels but no normalization says how they become "
                            "model input.", "Record one (gate --normalize) or save float32 model input.")
        self.class_names = class_names
        self.spec, self.split, self.separate_test, self.val_size = spec, split, separate_test, val_size
        self.where = where or spec or "the data"
        self._norm = _normalizer(self.normalization, source_channels * self.repeat) if self.normalization else None

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (Ray's read tasks): a memory-mapped x as its file, offset and shape, not its contents."""
        state = dict(self.__dict__)
        x = self.x
        if isinstance(x, np.memmap) and x.filename is not None and x.base is not None:
            state["x"] = ("memmap", str(x.filename), int(x.offset), x.dtype.str, x.shape,
                          "F" if x.flags.f_contiguous and not x.flags.c_contiguous else "C")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        x = state["x"]
        if isinstance(x, tuple) and x[0] == "memmap":
            _, filename, offset, dtype, shape, order = x
            state["x"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape, order=order)
        self.__dict__.update(state)

    def __len__(self) -> int:
        return int(len(self.index) if self.index is not None else self.x.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        c, h, w = (int(d) for d in self.x.shape[1:])
        return (c * self.repeat, h, w)

    @property
    def num_classes(self) -> int:
        return _num_classes(self)

    def labels(self) -> np.ndarray | None:
        if self.y is None:
            return None
        return np.asarray(self.y if self.index is None else self.y[self.index], dtype=np.int64)

    def batches(self, batch_size: int, rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """Batches of at most `batch_size` rows: all rows in order, or the rows `rows` in that order (data.Rows)."""
        n = len(self) if rows is None else len(rows)
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            if rows is None and self.index is None:
                pick: slice | np.ndarray = slice(start, stop)
                numbers = np.arange(start, stop)
            else:
                local = np.arange(start, stop) if rows is None else np.asarray(rows[start:stop], dtype=np.int64)
                numbers = pick = local if self.index is None else self.index[local]
            yield self._prepare(np.asarray(self.x[pick]), numbers), (None if self.y is None else
                                                                     np.asarray(self.y[pick], dtype=np.int64))

    def _prepare(self, x: np.ndarray, numbers: np.ndarray) -> np.ndarray:
        if self.repeat > 1:
            x = np.repeat(x, self.repeat, axis=1)
        if self._norm is not None:
            scale, mean, std = self._norm
            return ((x.astype(np.float32) * scale - mean) / std).astype(np.float32, copy=False)
        # a copy unless the read already made one: a memory-mapped slice is read-only (and not ours to keep)
        x = np.array(x, dtype=np.float32, copy=not (x.flags.writeable and x.flags.owndata))
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        check_finite(x, self.where, numbers)
        return x

    def select(self, rows: np.ndarray) -> ArrayRows:
        """The rows `rows` (indices within this split) as rows of their own."""
        return _select(self, rows)


_R = TypeVar("_R", "ArrayRows", "FolderRows")


def _select(rows: _R, picked: np.ndarray) -> _R:
    out = copy.copy(rows)
    out.index = np.asarray(picked, dtype=np.int64) if rows.index is None else rows.index[picked]
    return out


def _num_classes(rows: Any) -> int:
    if rows.class_names is not None:
        return len(rows.class_names)
    labels = rows.labels()
    return int(labels.max()) + 1 if labels is not None and len(labels) else 0


def num_classes(rows: Rows) -> int:
    """Classes of labelled rows: their class names, else the largest label + 1."""
    return _num_classes(rows)


# ------------------------------------------------------------------------------------ folder rows


DEFAULT_DECODE_THREADS = 2  # threads decoding images (Pillow releases the GIL): 429 -> 936 images/s here


class FolderRows:
    """Rows of an image folder (data.Rows): `listing`'s files decoded and prepared by `prep` per batch,
    then normalized with `normalization`. `index`: the row numbers of the listing this split holds.
    `threads` decode each batch in parallel, and the next batch is decoded while the caller works on
    the current one."""

    raw = True

    def __init__(self, listing: Any, prep: Any, normalization: dict, *, index: np.ndarray | None = None,
                 spec: str = "", split: str = "", separate_test: bool = True, val_size: int | None = None,
                 threads: int = DEFAULT_DECODE_THREADS):
        self.listing, self.prep, self.index = listing, prep, index
        self._pixels: dict = _repeat(normalization, prep.channels) or normalization
        self.normalization: dict | None = self._pixels
        self.class_names: list[str] | None = listing.class_names
        self.spec, self.split, self.separate_test, self.val_size = spec, split, separate_test, val_size
        self.threads = max(0, int(threads))

    def __len__(self) -> int:
        return int(len(self.index) if self.index is not None else len(self.listing))

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.prep.channels, *self.prep.size)

    @property
    def num_classes(self) -> int:
        return _num_classes(self)

    def labels(self) -> np.ndarray | None:
        labels = self.listing.labels
        if labels is None:
            return None
        return labels if self.index is None else labels[self.index]

    def _files(self, rows: np.ndarray) -> np.ndarray:
        return rows if self.index is None else self.index[rows]

    def read(self, numbers: np.ndarray, pool: Any = None) -> np.ndarray:
        """uint8 pixels [n, C, H, W] of the listing's files `numbers`."""
        from .images import prepare_image

        paths = [self.listing.path(int(i)) for i in numbers]
        out = np.empty((len(paths), *self.sample_shape), dtype=np.uint8)

        def one(i: int) -> None:
            out[i] = prepare_image(paths[i], self.prep)

        if pool is None:
            for i in range(len(paths)):
                one(i)
        else:
            for _ in pool.map(one, range(len(paths))):
                pass
        return out

    def batches(self, batch_size: int, rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """Batches of at most `batch_size` rows: all rows in order, or the rows `rows` in that order (data.Rows)."""
        from concurrent.futures import ThreadPoolExecutor

        from .images import require_pillow

        require_pillow()
        n = len(self) if rows is None else len(rows)
        picks = [self._files(np.arange(s, min(s + batch_size, n)) if rows is None
                             else np.asarray(rows[s:s + batch_size], dtype=np.int64)) for s in range(0, n, batch_size)]
        labels = self.listing.labels
        if not self.threads:
            for numbers in picks:
                yield normalize_pixels(self.read(numbers), self._pixels), (
                    None if labels is None else labels[numbers])
            return
        # one thread reads the next batch ahead (its files decoded by the pool) while this one is used
        with ThreadPoolExecutor(self.threads) as pool, ThreadPoolExecutor(1) as ahead:
            pending = ahead.submit(self.read, picks[0], pool) if picks else None
            for i, numbers in enumerate(picks):
                assert pending is not None
                raw = pending.result()
                pending = ahead.submit(self.read, picks[i + 1], pool) if i + 1 < len(picks) else None
                yield normalize_pixels(raw, self._pixels), (None if labels is None else labels[numbers])

    def select(self, rows: np.ndarray) -> FolderRows:
        """The rows `rows` (indices within this split) as rows of their own."""
        return _select(self, rows)


# ------------------------------------------------------------------------------------------ sources


def _fashion_mnist(part: str, data_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """Normalized float32 [N, 1, 28, 28] and int64 labels of part "train" or "test" (in memory)."""
    folder = Path(data_dir) if data_dir is not None else DEFAULT_FMNIST_DIR
    images, labels = _read_fashion_mnist(folder, part)
    x = (images.astype(np.float32) / 255.0 - _FMNIST_MEAN) / _FMNIST_STD
    return x[:, None, :, :].astype(np.float32), labels.astype(np.int64)


FMNIST_NORMALIZATION = {"scale": 1.0 / 255.0, "mean": [_FMNIST_MEAN], "std": [_FMNIST_STD]}


def _npz_members(path: Path) -> dict[str, Any]:
    """name -> a callable giving the member's array: memory-mapped where it is stored uncompressed."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as err:
        raise UserError(f"Cannot read {path} as a NumPy .npz archive: {err}.",
                        "Save it with np.savez(path, x=..., y=...).") from err
    members: dict[str, Any] = {}
    with archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            name = info.filename[:-4]
            members[name] = functools.partial(_npz_member, path, info)
    return members


def _npz_member(path: Path, info: zipfile.ZipInfo) -> np.ndarray:
    where = f"{path} (array {info.filename[:-4]})"
    try:
        if info.compress_type == zipfile.ZIP_STORED:
            with open(path, "rb") as f:
                f.seek(info.header_offset)
                local = f.read(30)
                if local[:4] != b"PK\x03\x04":
                    raise ValueError("bad local header")
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                f.seek(info.header_offset + 30 + name_len + extra_len)
                version = np.lib.format.read_magic(f)
                shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                         else np.lib.format.read_array_header_2_0(f))
                if dtype.hasobject:
                    raise ValueError("object arrays are not read (they would need pickle)")
                offset = f.tell()
            if not shape or int(np.prod(shape)) == 0:
                return np.zeros(shape, dtype)
            return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape),
                             order="F" if fortran else "C")
        with zipfile.ZipFile(path) as archive, archive.open(info) as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise UserError(f"Cannot read {where}: {err}.", "Save it with np.savez(path, x=..., y=...).") from err


def _npy_members(folder: Path) -> dict[str, Any]:
    def load(p: Path) -> np.ndarray:
        try:
            return np.load(p, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise UserError(f"Cannot read {p} as a .npy file: {err}.", "Save it with np.save(path, array).") from err

    return {p.stem: functools.partial(load, p) for p in sorted(folder.glob("*.npy"))}


def _check_arrays(x: np.ndarray, y: np.ndarray | None, where: str) -> None:
    if x.ndim != 4:
        raise UserError(f"{where}: x has shape {x.shape}; expected 4 dimensions [N, C, H, W].",
                        "Add the channel axis (x[:, None] for grayscale) and save again.")
    if x.dtype not in (np.float32, np.uint8):
        raise UserError(f"{where}: x has dtype {x.dtype}; expected float32 (normalized as the model expects) or "
                        "uint8 raw pixels.", "Convert with x.astype(np.float32) after normalizing.")
    if y is None:
        return
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise UserError(f"{where}: y has shape {y.shape}; expected [N] with N = {x.shape[0]} (rows of x).",
                        "Save one integer label per image.")
    if y.dtype != np.int64:
        raise UserError(f"{where}: y has dtype {y.dtype}; expected int64 class indices.",
                        "Convert with y.astype(np.int64).")
    if y.size and y.min() < 0:
        raise UserError(f"{where}: y holds negative labels.", "Labels must be class indices 0..classes-1.")


@dataclass
class _Arrays:
    x: np.ndarray
    y: np.ndarray | None
    index: np.ndarray | None
    class_names: list[str] | None
    separate_test: bool
    val_size: int | None
    where: str


def _arrays(members: dict[str, Any], split: str, *, val_size: int | None, seed: int, where: str,
            labelled: bool | None) -> _Arrays:
    """Pick `split`'s arrays out of an npz's (or npy folder's) members (the module docstring's layouts)."""
    keys = set(members)
    names = [str(n) for n in members["class_names"]()] if "class_names" in keys else None

    def pair(suffix: str) -> tuple[np.ndarray, np.ndarray]:
        x, y = members["x" + suffix](), np.asarray(members["y" + suffix]())
        _check_arrays(x, y, f"{where} (x{suffix}, y{suffix})")
        return x, y

    if {"x", "y"} <= keys:
        x, y = pair("")
        if split == "test":
            return _Arrays(x, y, None, names, False, None, where)
        cut = val_size if val_size is not None else default_val_size(len(y))
        return _Arrays(x, y, split_rows(len(y), split, val_size=cut, seed=seed, where=where), names, False, cut, where)
    if "x" in keys and "y" not in keys and "x_train" not in keys:  # unlabelled images (score)
        if split != "test":
            raise UserError(f"{where} holds only x (no labels, no splits): it has no {split} split.",
                            "Score it whole: leave out --split.")
        if labelled is not None:
            raise UserError(f"{where} holds only x: no labels (y), which this needs.",
                            "Save it with labels: np.savez(path, x=images, y=labels).")
        x = members["x"]()
        _check_arrays(x, None, f"{where} (x)")
        return _Arrays(x, None, None, names, False, None, where)
    if not {"x_train", "y_train"} <= keys:
        raise UserError(f"{where} holds arrays {sorted(keys)}; expected `x` and `y`, or `x_train`, "
                        "`y_train`, `x_test`, `y_test` (optionally `x_val`, `y_val`).",
                        "Save it with np.savez(path, x=images, y=labels).")
    if split == "test":
        if not {"x_test", "y_test"} <= keys:
            raise UserError(f"{where} has x_train but no x_test / y_test arrays.",
                            "Add the held-out test set as x_test and y_test.")
        x, y = pair("_test")
        return _Arrays(x, y, None, names, True, None, where)
    if {"x_val", "y_val"} <= keys:
        x, y = pair("_" + split)
        return _Arrays(x, y, None, names, True, None, where)
    x, y = pair("_train")
    cut = val_size if val_size is not None else default_val_size(len(y))
    return _Arrays(x, y, split_rows(len(y), split, val_size=cut, seed=seed, where=where), names, True, cut, where)


def _folder(path_text: str, split: str, *, val_size: int | None, seed: int, prep: Any,
            normalization: dict | str | None, labelled: bool | None, threads: int) -> FolderRows:
    from .images import ImagePrep, scan_folder
    from .images import normalization as parse_normalization

    root = Path(path_text)
    spec = f"folder:{path_text}"
    if not path_text or not root.is_dir():
        raise UserError(f"--data {spec}: no such folder.",
                        "Give a folder holding one sub-folder of images per class (or train/ and test/ trees of them).")
    subs = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    if prep is None:
        raise UserError(f"--data {spec}: the image size is not known.", "Give --image-size.")
    if not isinstance(prep, ImagePrep):
        prep = ImagePrep.from_dict(prep)
    norm = parse_normalization(normalization, prep.channels)
    rows: dict[str, Any] = {"spec": spec, "split": split, "threads": threads}
    if subs & {"train", "test"}:  # train/ and test/ (val/) trees
        other = sorted(subs - {"train", "val", "test"})
        if other:
            raise UserError(f"{spec} holds train/ or test/ and also {', '.join(other)}/.",
                            "Keep only train/, test/ and optionally val/ at the top (class folders go inside them).")
        train_dir = root / "train"
        classes = scan_folder(train_dir, labelled=True).class_names if train_dir.is_dir() else None
        if split == "test" or (split == "val" and "val" in subs):
            if split not in subs:
                raise UserError(f"{spec} has no {split}/ folder.", f"Add {split}/ with the same class folders as train/.")
            listing = scan_folder(root / split, class_names=classes, labelled=labelled if classes is None else True)
            return FolderRows(listing, prep, norm, separate_test=True, **rows)
        if classes is None:
            raise UserError(f"{spec} has no train/ folder.", "Add train/ with one sub-folder of images per class.")
        listing = scan_folder(train_dir, labelled=True)
        if "val" in subs:
            return FolderRows(listing, prep, norm, separate_test=True, **rows)
        cut = val_size if val_size is not None else default_val_size(len(listing))
        index = split_rows(len(listing), split, val_size=cut, seed=seed, where=spec)
        return FolderRows(listing, prep, norm, index=index, separate_test=True, val_size=cut, **rows)
    listing = scan_folder(root, labelled=labelled if split == "test" else True)
    if split == "test":
        return FolderRows(listing, prep, norm, separate_test=False, **rows)
    cut = val_size if val_size is not None else default_val_size(len(listing))
    index = split_rows(len(listing), split, val_size=cut, seed=seed, where=spec)
    return FolderRows(listing, prep, norm, index=index, separate_test=False, val_size=cut, **rows)


def open_rows(spec: str, split: str, *, data_dir: str | Path | None = None, channels: int | None = None,
              val_size: int | None = DEFAULT_VAL_SIZE, seed: int = 0, normalization: dict | str | None = None,
              image: Any = None, labelled: bool | None = True,
              threads: int = DEFAULT_DECODE_THREADS) -> ArrayRows | FolderRows:
    """Split "train", "val" or "test" of data set `spec` as Rows (module docstring), without reading the
    images. `channels`: repeat 1-channel arrays to this many. `normalization`: how raw pixels become
    model input (a dict in the manifest's form, or a --normalize choice: imagenet, none, MEAN/STD;
    None: the source's own). `image`: the images.ImagePrep (or its recorded dict) of `folder:` data.
    `labelled` None: a test split may be unlabelled (an npz holding only `x`, a folder of images
    without class folders). `val_size` None: the default for the data's size (default_val_size)."""
    if split not in SPLITS:
        raise UserError(f"Unknown split {split!r}.", f"Choose one of: {', '.join(SPLITS)}.")
    if spec == "fashion-mnist":
        images, labels = _read_fashion_mnist(Path(data_dir) if data_dir else DEFAULT_FMNIST_DIR,
                                             "test" if split == "test" else "train")
        x = images[:, None, :, :]  # uint8 [N, 1, 28, 28], a view
        index, cut = None, None
        if split != "test":
            cut = val_size if val_size is not None else default_val_size(len(labels))
            index = split_rows(len(labels), split, val_size=cut, seed=seed, where=spec)
        return ArrayRows(x, labels.astype(np.int64), index=index, class_names=list(FMNIST_CLASSES),
                         normalization=_parse_normalization(normalization, 1) or FMNIST_NORMALIZATION, channels=channels, spec=spec, split=split, val_size=cut)
    if spec.startswith(("npz:", "npy:")):
        path = Path(spec[4:])
        if spec.startswith("npz:"):
            if not spec[4:] or not path.is_file():
                raise UserError(f"--data {spec}: no such file.", "Give the path of an existing .npz file.")
            members = _npz_members(path)
        else:
            if not spec[4:] or not path.is_dir():
                raise UserError(f"--data {spec}: no such folder.",
                                "Give a folder holding x.npy and y.npy (or x_train.npy, y_train.npy, ...).")
            members = _npy_members(path)
        arrays = _arrays(members, split, val_size=val_size, seed=seed, where=str(path), labelled=labelled)
        norm: dict | None = None
        if arrays.x.dtype == np.uint8:
            target = int(channels or arrays.x.shape[1])
            norm = _parse_normalization(normalization, target) or _default_pixels(target)
        return ArrayRows(arrays.x, arrays.y, index=arrays.index, class_names=arrays.class_names, normalization=norm,
                         channels=channels, spec=spec, split=split, separate_test=arrays.separate_test,
                         val_size=arrays.val_size, where=arrays.where)
    if spec.startswith("folder:"):
        return _folder(spec[7:], split, val_size=val_size, seed=seed, prep=image, normalization=normalization,
                       labelled=labelled, threads=threads)
    raise UserError(f"Unknown data set {spec!r}.",
                    "Use fashion-mnist, npz:PATH (arrays x [N,C,H,W] float32 or uint8 and y int64 [N]), npy:DIR "
                    "(the same arrays as .npy files) or folder:PATH (one sub-folder of images per class).")


def _parse_normalization(normalization: dict | str | None, channels: int) -> dict | None:
    if normalization is None or isinstance(normalization, dict):
        return normalization
    from .images import normalization as parse

    return parse(normalization, channels)


def _default_pixels(channels: int) -> dict:
    """The normalization of raw pixels that record none: ImageNet's for 3 channels, else [0, 1] scaling."""
    from .images import normalization as parse

    return parse(None, channels)


def load_dataset(spec: str, split: str, *, data_dir: str | Path | None = None, channels: int | None = None,
                 val_size: int | None = DEFAULT_VAL_SIZE, seed: int = 0,
                 normalization: dict | str | None = None, image: Any = None) -> Dataset:
    """Split "train", "val" or "test" of data set `spec` in memory (open_rows, then every row read as
    normalized float32: for small data; consumers of any size read `open_rows`' batches)."""
    rows = open_rows(spec, split, data_dir=data_dir, channels=channels, val_size=val_size, seed=seed,
                     normalization=normalization, image=image)
    return materialize(rows)


def materialize(rows: Any) -> Dataset:
    """Every row of `rows` as a Dataset (float32 in memory)."""
    n = len(rows)
    x = np.empty((n, *rows.sample_shape), dtype=np.float32)
    y = np.empty(n, dtype=np.int64)
    at = 0
    for xb, yb in rows.batches(max(1, min(n, 4096))):
        x[at:at + len(xb)] = xb
        if yb is not None:
            y[at:at + len(xb)] = yb
        at += len(xb)
    return Dataset(x, y, rows.class_names, rows.normalization, getattr(rows, "spec", ""), getattr(rows, "split", ""),
                   getattr(rows, "separate_test", True), getattr(rows, "val_size", None))


def load_splits(spec: str, *, data_dir: str | Path | None = None, channels: int | None = None,
                val_size: int | None = DEFAULT_VAL_SIZE, seed: int = 0) -> dict[str, Dataset]:
    """All three splits of `spec` ("train", "val", "test") in memory, cut with the same validation split."""
    return {s: load_dataset(spec, s, data_dir=data_dir, channels=channels, val_size=val_size, seed=seed)
            for s in SPLITS}


def open_splits(spec: str, **kwargs: Any) -> dict[str, ArrayRows | FolderRows]:
    """All three splits of `spec` as Rows (open_rows' keywords), cut with the same validation split."""
    return {s: open_rows(spec, s, **kwargs) for s in SPLITS}


def open_for_model(spec: str, splits: tuple[str, ...] = SPLITS, *, input_shape: Sequence[int | str],
                   normalization: dict | None, image: dict | None, where: str, data_dir: str | Path | None = None,
                   repeat_channels: bool = False, val_size: int | None = DEFAULT_VAL_SIZE, seed: int = 0,
                   labelled: bool | None = True) -> dict[str, ArrayRows | FolderRows]:
    """Splits of `spec` as Rows prepared the way a gated model or a bundle (`where`) records: its input
    shape [C, H, W], its normalization of raw pixels and, for image folders, its image preparation
    (images.ImagePrep's dict; a model gated on arrays: the model's H x W, no border cut). Raw pixels from
    a source without a normalization of its own are refused when the model records none."""
    chw = tuple(int(d) for d in input_shape)
    prep: Any = image
    if spec.startswith("folder:") and prep is None:
        from .images import ImagePrep

        prep = ImagePrep.for_input(chw)
    out = {}
    for split in splits:
        rows = open_rows(spec, split, data_dir=data_dir, channels=chw[0] if repeat_channels else None,
                         val_size=val_size, seed=seed, normalization=normalization, image=prep, labelled=labelled)
        if normalization is None and rows.raw and spec != "fashion-mnist":
            raise UserError(f"{spec} holds raw pixels, but {where} records no normalization that turns them into its "
                            "input (it was gated on float32 model input).",
                            "Give float32 model input normalized as for gating, or gate on this data.")
        check_input_shape(rows.sample_shape, chw, where=f"data set {spec!r} ({split})")
        out[split] = rows
    return out


def rows_for_bundle(manifest: Any, data: str, splits: tuple[str, ...], *, where: str, **kwargs: Any) -> dict[str, Any]:
    """Splits of `data` as Rows prepared as a bundle's manifest.Manifest records (input shape, normalization,
    image preparation): open_for_model's keywords."""
    image = manifest.input.image.to_dict() if manifest.input.image is not None else None
    return open_for_model(data, splits, input_shape=manifest.input.shape[1:], normalization=manifest.input.normalization,
                          image=image, where=where, **kwargs)


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


def split_rows(n: int, split: str, *, val_size: int, seed: int, where: str = "the data") -> np.ndarray:
    """The sorted row indices of "train" or "val" out of a training set of `n` rows: the validation split
    is the first `val_size` rows of a permutation seeded by `seed`, so the same seed gives the same
    validation rows in gate and calibrate (and in any script that trains a backbone beside them)."""
    if not 0 < val_size < n:
        raise SplitTooLarge(where, val_size, n)
    # A fixed seeded permutation: the same seed gives the same validation rows in gate and calibrate.
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[:val_size] if split == "val" else order[val_size:])


def check_input_shape(x: np.ndarray | tuple[int, ...], expected_chw: tuple[int, ...] | list[int], *,
                      where: str = "the data") -> None:
    """Refuse data whose per-sample shape (an array's x.shape[1:], or a Rows' sample_shape given as a tuple)
    is not the model's (C, H, W), with the fix when one exists."""
    expected = tuple(int(d) for d in expected_chw)
    got = tuple(int(d) for d in (x if isinstance(x, tuple) else x.shape[1:]))
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
    """The file or folder a data spec reads (npz:PATH, npy:DIR, folder:PATH), None for the built-in sets:
    an input no output may replace."""
    for prefix in ("npz:", "npy:", "folder:"):
        if spec and spec.startswith(prefix):
            return spec[len(prefix):]
    return None
