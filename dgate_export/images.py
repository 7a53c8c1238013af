"""Image files as model input: the image-folder convention and how one image is prepared (no torch).

`prepare_image(path, prep)` decodes one JPEG or PNG and prepares it the way torchvision's
`Resize(prep.resize)` + `CenterCrop(prep.size)` do on a PIL image, after converting it to the model's
colour mode: uint8 pixels [C, H, W]. The rest (x = (raw * scale - mean[c]) / std[c]) is the bundle's
input.normalization, applied by `data.FolderRows` and by the runtime to uint8 input alike. `ImagePrep`
is what a gated model and its bundle record (`input.image` in manifest.json, docs/manifest.md), so
`gate`, `calibrate`, `bench`, `score` and examples/classify.py prepare images the same way.

- colour: every file is converted to `prep.color` ("RGB" for 3-channel models, "L" for 1-channel ones)
  with Pillow's `convert`, as torchvision's ImageFolder loader does: a grayscale file among RGB ones has
  its gray channel repeated, a palette or RGBA file loses its palette and alpha.
- resize: the shorter side to `prep.resize` pixels (bilinear, Pillow's antialiased resize), the other in
  proportion (torchvision's rounding down); then the centre `prep.size` crop (torchvision's rounding).

`scan_folder(root)` lists an image folder: one sub-folder per class (sorted names are the class
indices), image files anywhere below it, in the order torchvision's ImageFolder uses (sorted folder
walk, sorted file names). Hidden files and folders (a leading dot) are skipped; any other file that is
not .jpg, .jpeg or .png, an empty class folder, or an image lying beside the class folders is refused
with its name. A folder of images without class sub-folders is unlabelled (what `score` classifies).
Decoding needs Pillow: `pip install 'dgate-export[images]'` (the compile extra has it via torchvision).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
PILLOW_HINT = "Install it: pip install 'dgate-export[images]' (Pillow; the [compile] extra brings it too)."
# Pixel scaling of every normalization below: x = (raw / 255 - mean[c]) / std[c].
SCALE = 1.0 / 255.0
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
NORMALIZE_CHOICES = ("imagenet", "none", "MEAN/STD")
COLORS = {1: "L", 3: "RGB"}
INTERPOLATIONS = ("bilinear",)


def require_pillow() -> Any:
    """PIL.Image, or a UserError naming the extra that installs it."""
    try:
        from PIL import Image
    except ImportError as err:
        raise UserError(f"Reading image files needs Pillow, which is not installed here ({err}).", PILLOW_HINT) from err
    return Image


def normalization(choice: str | dict | None, channels: int) -> dict[str, Any]:
    """The manifest's input.normalization for a --normalize choice on `channels`-channel images:
    "imagenet" (ImageNet's mean and std, 3 channels), "none" (pixels scaled to [0, 1]), "MEAN/STD"
    (one value, or one per channel, of each: "0.5/0.25" or "0.485,0.456,0.406/0.229,0.224,0.225"), or
    a dict already in the manifest's form. None: "imagenet" for 3 channels, "none" otherwise."""
    if isinstance(choice, dict):
        return choice
    if choice is None:
        choice = "imagenet" if channels == 3 else "none"
    text = choice.strip().lower()
    if text == "imagenet":
        if channels != 3:
            raise UserError(f"--normalize imagenet needs 3-channel images; this model takes {channels}.",
                            "Use --normalize none or MEAN/STD.")
        return {"scale": SCALE, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    if text == "none":
        return {"scale": SCALE, "mean": [0.0] * channels, "std": [1.0] * channels}
    mean_text, sep, std_text = text.partition("/")
    try:
        mean = [float(v) for v in mean_text.split(",") if v.strip()]
        std = [float(v) for v in std_text.split(",") if v.strip()]
    except ValueError:
        mean, std = [], []
    if not sep or len(mean) not in (1, channels) or len(std) not in (1, channels) or min(std, default=0) <= 0:
        raise UserError(f"--normalize {choice!r} is not imagenet, none or MEAN/STD (one value or {channels} of each, "
                        "std > 0, on pixels scaled to [0, 1]).", "e.g. --normalize 0.5/0.25 or --normalize imagenet.")
    return {"scale": SCALE, "mean": mean * (channels // len(mean)), "std": std * (channels // len(std))}


@dataclass(frozen=True)
class ImagePrep:
    """How an image file becomes uint8 model input [C, H, W] (see the module docstring)."""

    size: tuple[int, int]  # (H, W) of the centre crop: the model's input size
    resize: int  # the shorter side is resized to this many pixels first (>= the crop)
    color: str = "RGB"  # "RGB" or "L"
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        h, w = self.size
        if min(h, w) < 1 or self.resize < 1:
            raise UserError(f"Image size {h}x{w} and resize {self.resize} must be positive.",
                            "Give --image-size and --resize in pixels.")
        if self.resize < min(h, w):
            raise UserError(f"--resize {self.resize} is smaller than the image size {h}x{w}: the centre crop would "
                            "not fit.", f"Resize to at least {min(h, w)} (the default is the image size).")
        if self.color not in COLORS.values() or self.interpolation not in INTERPOLATIONS:
            raise UserError(f"Unknown image preparation: color {self.color!r}, interpolation {self.interpolation!r}.",
                            "Rebuild the bundle with this version of dgate-export.")

    @property
    def channels(self) -> int:
        return 3 if self.color == "RGB" else 1

    @classmethod
    def for_input(cls, chw: tuple[int, ...] | list[int], size: int | None = None,
                  resize: int | None = None) -> ImagePrep:
        """The preparation for a model taking [C, H, W]: crop `size` (default: the model's H x W),
        shorter side resized to `resize` first (default: the crop's shorter side: no border cut off)."""
        c, h, w = (int(d) for d in chw)
        if c not in COLORS:
            raise UserError(f"Image files give 1 (gray) or 3 (RGB) channels; this model takes {c}.",
                            "Feed it arrays (npz:PATH) instead.")
        if size is not None:
            h = w = int(size)
        return cls((h, w), int(resize) if resize is not None else min(h, w), COLORS[c])

    def to_dict(self) -> dict[str, Any]:
        return {"size": list(self.size), "resize": self.resize, "crop": "center", "color": self.color,
                "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, d: Any, where: str = "input.image") -> ImagePrep:
        """Parse the recorded form (ValueError naming the field when malformed)."""
        if not isinstance(d, dict):
            raise ValueError(f"{where} must be an object")  # noqa: TRY004 (the manifest's validation error)
        size = d.get("size")
        if (not isinstance(size, list) or len(size) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
            raise ValueError(f"{where}.size must be [H, W], positive integers")
        resize = d.get("resize")
        if not isinstance(resize, int) or isinstance(resize, bool) or resize < min(size):
            raise ValueError(f"{where}.resize must be an integer >= min(size)")
        if d.get("crop") != "center":
            raise ValueError(f"{where}.crop must be \"center\"")
        if d.get("color") not in COLORS.values():
            raise ValueError(f"{where}.color must be one of {', '.join(COLORS.values())}")
        if d.get("interpolation") not in INTERPOLATIONS:
            raise ValueError(f"{where}.interpolation must be one of {', '.join(INTERPOLATIONS)}")
        return cls((int(size[0]), int(size[1])), int(resize), str(d["color"]), str(d["interpolation"]))


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(width, height) with the shorter side `shorter`, the other in proportion (rounded down, as torchvision)."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def prepare_image(path: str | os.PathLike, prep: ImagePrep) -> np.ndarray:
    """One image file as uint8 [C, H, W] (module docstring); UserError naming the file when it cannot be decoded."""
    image_mod = require_pillow()
    try:
        with image_mod.open(path) as img:
            img = img.convert(prep.color)  # decodes the whole file: a truncated one fails here
    except (OSError, ValueError, SyntaxError, image_mod.DecompressionBombError) as err:
        raise UserError(f"{path}: cannot decode the image ({err}).",
                        "Remove or replace the file (every file in an image folder must be a JPEG or PNG image).") from err
    w, h = img.size
    new = resized_size(w, h, prep.resize)
    if new != (w, h):
        img = img.resize(new, image_mod.Resampling.BILINEAR)
        w, h = new
    ch, cw = prep.size
    if ch > h or cw > w:  # only where --resize is below the crop on a non-square image: never, see ImagePrep
        raise UserError(f"{path}: {w}x{h} after resizing is smaller than the crop {cw}x{ch}.",
                        "Give a larger --resize.")
    top, left = round((h - ch) / 2.0), round((w - cw) / 2.0)
    if (top, left, ch, cw) != (0, 0, h, w):
        img = img.crop((left, top, left + cw, top + ch))
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


# ------------------------------------------------------------------------------------------- listing


@dataclass
class FolderListing:
    """The image files of one folder tree, in ImageFolder's order, and their labels (None: unlabelled).

    File names are kept as one string and offsets (about the length of a relative path per row, not a
    Python object per row)."""

    root: Path
    class_names: list[str] | None
    labels: np.ndarray | None  # int64 [N]
    _names: str
    _starts: np.ndarray  # int64 [N + 1]

    def __len__(self) -> int:
        return len(self._starts) - 1

    def path(self, i: int) -> Path:
        return self.root / self._names[self._starts[i]:self._starts[i + 1]]


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _images_below(folder: Path, root: Path, where: str) -> list[str]:
    """Relative paths (to root) of the image files below `folder`, ImageFolder's order; refuses other files."""
    found: list[str] = []
    for dirpath, dirnames, filenames in sorted(os.walk(folder, followlinks=True)):
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]  # os.walk descends into what is left
        for name in sorted(filenames):
            if _is_hidden(name):
                continue
            path = Path(dirpath) / name
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise UserError(f"{where}: {path} is not an image file (only .jpg, .jpeg and .png are read).",
                                "Move it out of the image folder (hidden files, with a leading dot, are skipped).")
            found.append(str(path.relative_to(root)))
    return found


def _listing(root: Path, rel: list[str], class_names: list[str] | None, labels: list[int] | None) -> FolderListing:
    starts = np.zeros(len(rel) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rel], out=starts[1:])
    lab = np.asarray(labels, dtype=np.int64) if labels is not None else None
    return FolderListing(root, class_names, lab, "".join(rel), starts)


def scan_folder(root: str | os.PathLike, *, class_names: list[str] | None = None, where: str | None = None,
                labelled: bool | None = None) -> FolderListing:
    """List the image folder `root` (module docstring). `class_names`: the classes of the training tree
    this one must draw from (labels are their indices; a class folder of another name is refused).
    `labelled`: True requires class sub-folders, None also takes a flat folder of images (unlabelled)."""
    root = Path(root)
    where = where or f"folder:{root}"
    if not root.is_dir():
        raise UserError(f"{where}: no such folder.", "Give a folder holding one sub-folder of images per class.")
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    dirs = [e.name for e in entries if e.is_dir() and not _is_hidden(e.name)]
    loose = [e.name for e in entries if not e.is_dir() and not _is_hidden(e.name)]
    if not dirs:
        flat = _images_below(root, root, where) if loose else []
        if not flat:
            raise UserError(f"{where} holds no images.", "Give a folder holding one sub-folder of images per class.")
        if labelled:
            raise UserError(f"{where} holds images but no class sub-folders, so it has no labels.",
                            "Put the images of each class in a sub-folder named after the class.")
        return _listing(root, flat, None, None)
    if loose:
        raise UserError(f"{where}: {root / loose[0]} lies beside the class folders and belongs to no class.",
                        "Move it into its class folder, or out of the image folder.")
    index = {name: i for i, name in enumerate(class_names if class_names is not None else dirs)}
    unknown = [d for d in dirs if d not in index]
    if unknown:
        raise UserError(f"{where}: class folder(s) {', '.join(unknown)} are not among the training classes "
                        f"({', '.join(index)}).", "Use the class folder names of the training images.")
    rel: list[str] = []
    labels: list[int] = []
    for name in dirs:
        found = _images_below(root / name, root, where)
        if not found:
            raise UserError(f"{where}: the class folder {root / name} holds no images.",
                            "Add its images, or remove the folder (the classes are the sub-folders).")
        rel.extend(found)
        labels.extend([index[name]] * len(found))
    return _listing(root, rel, list(index), labels)
