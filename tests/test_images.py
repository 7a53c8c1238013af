"""Image folders (`folder:PATH`): how one image is prepared, what a folder holds, and the bad folders.

Images are real Fashion-MNIST pictures written as JPEG / PNG files (up-sampled, some to non-square
sizes), so decoding, resizing and cropping run on real pixels.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from dgate_export.data import DEFAULT_FMNIST_DIR, _read_fashion_mnist, normalize_pixels, open_rows
from dgate_export.errors import UserError
from dgate_export.images import ImagePrep, normalization, prepare_image, resized_size, scan_folder

Image = pytest.importorskip("PIL.Image")

pytestmark = pytest.mark.skipif(
    not (DEFAULT_FMNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


def fmnist(i: int, size: tuple[int, int] = (32, 32), mode: str = "RGB"):
    """Test image i of Fashion-MNIST as a PIL image of `size` (width, height) and `mode`, and its label."""
    images, labels = _read_fashion_mnist(DEFAULT_FMNIST_DIR, "test")
    img = Image.fromarray(np.asarray(images[i])).resize(size, Image.Resampling.BICUBIC)
    # a little colour so that the channels differ (a gray picture would hide a channel mix-up)
    if mode == "RGB":
        a = np.asarray(img.convert("RGB")).copy()
        a[..., 0] = 255 - a[..., 0]
        img = Image.fromarray(a)
    return img.convert(mode), int(labels[i])


def write_folder(root, per_class: dict[str, list[int]], *, size=(32, 32), ext=".png"):
    for name, rows in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in rows:
            img, _ = fmnist(i, size)
            img.save(root / name / f"{i:05d}{ext}")
    return root


@pytest.mark.parametrize("size, prep", [((40, 30), ImagePrep((24, 24), 28)), ((30, 40), ImagePrep((20, 20), 20)),
                                        ((32, 32), ImagePrep((32, 32), 32)), ((33, 50), ImagePrep((21, 21), 27)),
                                        ((50, 33), ImagePrep((21, 21), 27))])
@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_preparation_is_torchvisions_resize_and_centre_crop(tmp_path, size, prep, ext):
    """The runtime side prepares a file as torchvision's Resize + CenterCrop do (the compile side's
    training scripts use those), without torch."""
    transforms = pytest.importorskip("torchvision.transforms")
    img, _ = fmnist(7, size)
    path = tmp_path / f"a{ext}"
    img.save(path)
    ours = prepare_image(path, prep)
    with Image.open(path) as f:
        theirs = transforms.CenterCrop(prep.size)(transforms.Resize(prep.resize)(f.convert("RGB")))
    assert ours.shape == (3, *prep.size) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, np.asarray(theirs).transpose(2, 0, 1))
    assert resized_size(*size, prep.resize) == Image.open(path).convert("RGB").resize(
        resized_size(*size, prep.resize)).size


def test_grayscale_and_palette_files_among_rgb_are_converted(tmp_path):
    """Documented choice: every file is converted to the model's colour mode (a gray file's channel
    repeated, a palette file's colours looked up, alpha dropped), as torchvision's ImageFolder does."""
    rgb, _ = fmnist(3)
    rgb.save(tmp_path / "rgb.png")
    rgb.convert("L").save(tmp_path / "gray.jpg")
    rgb.convert("P").save(tmp_path / "palette.png")
    rgb.convert("RGBA").save(tmp_path / "alpha.png")
    prep = ImagePrep((32, 32), 32)
    gray = prepare_image(tmp_path / "gray.jpg", prep)
    np.testing.assert_array_equal(gray[0], gray[1])
    np.testing.assert_array_equal(gray[0], gray[2])
    np.testing.assert_array_equal(prepare_image(tmp_path / "alpha.png", prep), prepare_image(tmp_path / "rgb.png", prep))
    palette = prepare_image(tmp_path / "palette.png", prep)
    assert palette.shape == (3, 32, 32)
    one = prepare_image(tmp_path / "rgb.png", ImagePrep((32, 32), 32, "L"))
    assert one.shape == (1, 32, 32)


def test_folder_rows_labels_order_and_normalization(tmp_path):
    write_folder(tmp_path / "train", {"b_bag": [0, 1, 2, 3, 4, 5], "a_shirt": [6, 7, 8, 9]}, size=(40, 32))
    write_folder(tmp_path / "test", {"b_bag": [10, 11]})  # a test tree may hold fewer classes
    prep = ImagePrep((24, 24), 28)
    spec = f"folder:{tmp_path}"
    train = open_rows(spec, "train", val_size=3, image=prep, normalization="imagenet")
    val = open_rows(spec, "val", val_size=3, image=prep, normalization="imagenet")
    test = open_rows(spec, "test", image=prep, normalization="imagenet")
    assert train.class_names == ["a_shirt", "b_bag"] and test.class_names == ["a_shirt", "b_bag"]
    assert (len(train), len(val), len(test)) == (7, 3, 2) and test.separate_test
    assert sorted(np.concatenate([train.index, val.index]).tolist()) == list(range(10))  # indices, disjoint
    assert test.labels().tolist() == [1, 1]
    listing = scan_folder(tmp_path / "train")
    assert [listing.path(i).parent.name for i in range(10)] == ["a_shirt"] * 4 + ["b_bag"] * 6
    assert train.sample_shape == (3, 24, 24) and train.normalization == normalization("imagenet", 3)
    got = list(train.batches(4, rows=np.array([5, 0, 2])))
    assert [len(b[0]) for b in got] == [3]
    x, y = got[0]
    files = [listing.path(int(i)) for i in train.index[[5, 0, 2]]]
    expected = normalize_pixels(np.stack([prepare_image(f, prep) for f in files]), normalization("imagenet", 3))
    np.testing.assert_allclose(x, expected, rtol=0, atol=1e-6)
    assert y.tolist() == listing.labels[train.index[[5, 0, 2]]].tolist()
    # the same rows with threads and without, in order
    one = np.concatenate([b[0] for b in train.batches(2)])
    train.threads = 0
    np.testing.assert_array_equal(one, np.concatenate([b[0] for b in train.batches(3)]))


def test_one_set_folder_and_unlabelled_folder(tmp_path):
    write_folder(tmp_path / "set", {"x": [0, 1, 2, 3], "y": [4, 5, 6, 7]})
    prep = ImagePrep((32, 32), 32)
    test = open_rows(f"folder:{tmp_path / 'set'}", "test", image=prep)
    assert len(test) == 8 and not test.separate_test
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        fmnist(i)[0].save(flat / f"{i}.jpg")
    (flat / ".DS_Store").write_bytes(b"\0\1")  # hidden files are skipped
    rows = open_rows(f"folder:{flat}", "test", image=prep, labelled=None)
    assert len(rows) == 3 and rows.labels() is None
    assert [b[1] for b in rows.batches(2)] == [None, None]
    with pytest.raises(UserError, match="no class sub-folders"):
        open_rows(f"folder:{flat}", "train", image=prep)


def bad(tmp_path, what):
    """A train folder with one bad thing in it; returns the path the error must name."""
    root = write_folder(tmp_path / "data", {"a": [0, 1, 2], "b": [3, 4, 5]})
    if what == "corrupt":
        path = root / "b" / "00009.jpg"
        path.write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    elif what == "truncated":
        path = root / "a" / "00010.jpg"
        fmnist(10)[0].save(path)
        path.write_bytes(path.read_bytes()[:200])
    elif what == "empty class":
        path = root / "c"
        path.mkdir()
    elif what == "not an image":
        path = root / "a" / "notes.txt"
        path.write_text("labels were checked by hand")
    elif what == "loose file":
        path = root / "00011.png"
        fmnist(11)[0].save(path)
    return root, path


@pytest.mark.parametrize("what", ["corrupt", "truncated", "empty class", "not an image", "loose file"])
def test_bad_folders_name_the_file(tmp_path, what):
    root, path = bad(tmp_path, what)
    with pytest.raises(UserError) as info:
        rows = open_rows(f"folder:{root}", "test", image=ImagePrep((32, 32), 32))
        for _ in rows.batches(4):  # a file that lists fine but cannot be decoded fails when it is read
            pass
    assert str(path) in str(info.value)


def test_folder_user_errors(tmp_path):
    prep = ImagePrep((32, 32), 32)
    with pytest.raises(UserError, match="no such folder"):
        open_rows(f"folder:{tmp_path / 'nope'}", "test", image=prep)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        open_rows(f"folder:{tmp_path / 'empty'}", "test", image=prep)
    write_folder(tmp_path / "d" / "train", {"a": [0, 1], "b": [2, 3]})
    write_folder(tmp_path / "d" / "test", {"c": [4]})
    with pytest.raises(UserError, match="not among the training classes"):
        open_rows(f"folder:{tmp_path / 'd'}", "test", image=prep)
    (tmp_path / "d" / "extras").mkdir()
    with pytest.raises(UserError, match="extras"):
        open_rows(f"folder:{tmp_path / 'd'}", "train", image=prep)
    with pytest.raises(UserError, match="smaller than the image size"):
        ImagePrep((32, 32), 30)
    with pytest.raises(UserError, match="MEAN/STD"):
        normalization("0.5,0.5/0.2", 3)
    assert normalization("0.5/0.25", 3) == {"scale": 1 / 255, "mean": [0.5] * 3, "std": [0.25] * 3}
    assert normalization(None, 1)["mean"] == [0.0]


def test_missing_pillow_is_a_user_error_naming_the_extra(tmp_path, monkeypatch):
    write_folder(tmp_path, {"a": [0], "b": [1]})
    rows = open_rows(f"folder:{tmp_path}", "test", image=ImagePrep((32, 32), 32))  # listing needs no Pillow
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(UserError, match=r"dgate-export\[images\]"):
        next(rows.batches(2))


def test_prep_records_round_trip_and_refuse_bad_fields():
    prep = ImagePrep((224, 224), 256, "RGB")
    assert ImagePrep.from_dict(prep.to_dict()) == prep
    assert ImagePrep.for_input((1, 28, 28)) == ImagePrep((28, 28), 28, "L")
    for broken in ({**prep.to_dict(), "size": [224]}, {**prep.to_dict(), "resize": 100},
                   {**prep.to_dict(), "crop": "random"}, {**prep.to_dict(), "color": "CMYK"}):
        with pytest.raises(ValueError):
            ImagePrep.from_dict(broken)
    with pytest.raises(UserError, match="1 \\(gray\\) or 3 \\(RGB\\)"):
        ImagePrep.for_input((4, 28, 28))
