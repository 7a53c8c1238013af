"""Classify images with a built bundle: the runtime embedded in a program that has no torch.

    python examples/classify.py engines/NAME data.npz          # x [N, C, H, W] or [N, H, W], optional y
    python examples/classify.py engines/NAME folder/            # its JPEG / PNG images (needs Pillow)
    python examples/classify.py engines/NAME data.npz --thresholds 0.9 0.8 --show 5

Needs numpy and onnxruntime only (plus Pillow for image folders): `dgate_export.runtime` imports
neither torch nor onnx. A folder's images (directly in it, or in one sub-folder per class: then their
labels are the sorted class folders) are prepared as the bundle records in input.image (colour mode,
resize, centre crop: what `gate --data folder:` used; a bundle gated on arrays: the model's size, no
border cut), exactly as `dgate-export score` prepares them. Integer pixels (uint8) are normalized by
the runtime with the bundle's recorded input.normalization; float arrays are taken as model input as
they are.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

try:
    from dgate_export.errors import UserError
    from dgate_export.runtime import GatedRuntime
except ImportError:  # a checkout without `pip install -e .`: use the package next to this folder
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from dgate_export.errors import UserError
    from dgate_export.runtime import GatedRuntime


def load_npz(path: Path, channels: int) -> tuple[np.ndarray, np.ndarray | None]:
    with np.load(path) as data:
        if "x" not in data:
            raise UserError(f"{path} has no array named 'x' (it has {', '.join(data.files) or 'none'}).",
                            "Save the images as np.savez(path, x=images, y=labels).")
        x, y = data["x"], data.get("y")
    if x.ndim == 3 and channels == 1:
        x = x[:, None]  # [N, H, W] grayscale: add the channel axis
    return x, y


def load_folder(folder: Path, rt: GatedRuntime) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    """uint8 pixels of every image in `folder`, prepared as the bundle records; file names; labels or None."""
    from dgate_export.images import ImagePrep, prepare_image, scan_folder

    prep = rt.manifest.input.image or ImagePrep.for_input(rt.input_shape)
    folders = {p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")}
    # class folders named as the bundle's classes take their indices; other names: their sorted order
    known = rt.class_names if rt.class_names and folders <= set(rt.class_names) else None
    listing = scan_folder(folder, class_names=known, labelled=None)
    paths = [listing.path(i) for i in range(len(listing))]
    x = np.stack([prepare_image(p, prep) for p in paths])
    return x, [str(p.relative_to(folder)) for p in paths], listing.labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="bundle directory written by `dgate-export build`")
    parser.add_argument("input", type=Path, help=".npz file (x, optional y) or a folder of PNG images")
    parser.add_argument("--thresholds", type=float, nargs="+", help="one per gate (default: the bundle's)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads per segment")
    parser.add_argument("--show", type=int, default=10, help="print this many per-sample lines")
    args = parser.parse_args(argv)
    try:
        options = {} if args.threads is None else {"intra_op_num_threads": args.threads}
        rt = GatedRuntime.load(args.bundle, thresholds=args.thresholds, **options)
        names: list[str] | None = None
        y = None
        if args.input.is_dir():
            x, names, y = load_folder(args.input, rt)
        elif args.input.is_file():
            x, y = load_npz(args.input, rt.input_shape[0])
        else:
            raise UserError(f"{args.input} does not exist.", "Pass an .npz file or a folder of images.")
        start = time.perf_counter()
        res = rt.run(x)
        seconds = time.perf_counter() - start
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    classes = rt.class_names or [str(i) for i in range(rt.num_classes)]
    for i in range(min(args.show, len(x))):
        label = names[i] if names else f"#{i}"
        truth = f"  (true: {classes[int(y[i])]})" if y is not None else ""
        print(f"{label}: {classes[res.predictions[i]]}  exit {res.exits[i]}  confidence {res.confidence[i]:.3f}"
              f"{truth}")
    n = len(x)
    print(f"{n} samples in {seconds * 1e3:.1f} ms ({n / seconds:.0f} samples/s)")
    gates = [f"gate {k}: {c}" for k, c in enumerate(res.exit_counts[:-1])]
    print("exits: " + ", ".join(gates + [f"final: {res.exit_counts[-1]}"]))
    if y is not None:
        print(f"accuracy: {float(np.mean(res.predictions == y)):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
