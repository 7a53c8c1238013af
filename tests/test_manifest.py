"""manifest.py: round trip, validation of every contract rule, sha256 verification. No torch needed."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from dgate_export.errors import UserError
from dgate_export.manifest import (
    FORMAT,
    Manifest,
    check_files,
    load_manifest,
    sha256_file,
    verify_bundle,
    write_manifest,
)


def _t(name, shape, dtype="float32"):
    return {"name": name, "shape": shape, "dtype": dtype}


def _sample(tmp: Path, dtype: str = "float32") -> dict:
    """A valid 3-segment manifest (two carries cross the second cut) whose files exist in `tmp`."""
    files = {}
    for name in ("segment0.onnx", "segment1.onnx", "segment2.onnx", "baseline.onnx"):
        (tmp / name).write_bytes(name.encode() * 10)
        files[name] = sha256_file(tmp / name)

    def seg(i, inputs, outputs, gate):
        f = f"segment{i}.onnx"
        return {"index": i, "file": f, "sha256": files[f], "engine": {"file": f, "sha256": files[f]},
                "inputs": inputs, "outputs": outputs, "flops": 1000 * (i + 1), "gate": gate}

    d = dtype
    return {
        "format": FORMAT,
        "name": "demo",
        "created": "2026-11-25T20:00:00Z",
        "backend": "onnxruntime",
        "precision": "fp32" if dtype == "float32" else "fp16",
        "max_batch": 64,
        "opset": 18,
        "input": {"name": "input", "shape": ["batch", 1, 8, 8], "dtype": d, "layout": "NCHW",
                  "normalization": {"scale": 1 / 255, "mean": [0.286], "std": [0.353]}},
        "classes": {"count": 3, "names": ["a", "b", "c"]},
        "confidence": "max-softmax",
        "segments": [
            seg(0, [_t("input", ["batch", 1, 8, 8], d)],
                [_t("carry_0", ["batch", 4, 8, 8], d), _t("logits", ["batch", 3], d),
                 _t("confidence", ["batch"])],
                {"exit": "layer1", "threshold": 0.9, "head": "linear", "head_flops": 24}),
            seg(1, [_t("prev_carry_0", ["rows", 4, 8, 8], d), _t("index", ["batch"], "int64")],
                [_t("carry_0", ["batch", 8, 4, 4], d), _t("carry_1", ["batch", 4, 8, 8], d),
                 _t("logits", ["batch", 3], d), _t("confidence", ["batch"])],
                {"exit": "layer2", "threshold": 0.8, "head": "linear", "head_flops": 48}),
            seg(2, [_t("prev_carry_0", ["rows", 8, 4, 4], d), _t("prev_carry_1", ["rows", 4, 8, 8], d),
                    _t("index", ["batch"], "int64")],
                [_t("logits", ["batch", 3], d)], None),
        ],
        "baseline": {"file": "baseline.onnx", "sha256": files["baseline.onnx"],
                     "engine": {"file": "baseline.onnx", "sha256": files["baseline.onnx"]},
                     "inputs": [_t("input", ["batch", 1, 8, 8], d)], "outputs": [_t("logits", ["batch", 3], d)],
                     "flops": 6000},
        "source": {"checkpoint": "model.pt"},
        "tools": {"dgate_export": "0.1.0"},
        "backend_info": {},
    }


def _write(tmp: Path, data: dict) -> None:
    (tmp / "manifest.json").write_text(json.dumps(data))


def test_round_trip(tmp_path):
    data = _sample(tmp_path)
    m = Manifest.from_dict(data)
    assert m.to_dict() == data
    write_manifest(tmp_path, m)
    loaded = load_manifest(tmp_path)
    assert loaded == m
    assert loaded.root == tmp_path.resolve()
    assert loaded.thresholds == [0.9, 0.8]
    assert loaded.num_gates == 2
    assert loaded.segments[1].carries == ["carry_0", "carry_1"]
    assert loaded.segments[2].input_names == ["prev_carry_0", "prev_carry_1", "index"]
    assert loaded.segments[2].carry_inputs == [("prev_carry_0", "carry_0"), ("prev_carry_1", "carry_1")]
    assert loaded.segments[0].carry_inputs == []
    assert loaded.path("segment0.onnx") == tmp_path.resolve() / "segment0.onnx"
    assert not (tmp_path / "manifest.json.tmp").exists()
    # load_manifest also accepts the manifest file itself
    assert load_manifest(tmp_path / "manifest.json") == m


def test_fp16_round_trip(tmp_path):
    data = _sample(tmp_path, "float16")
    assert Manifest.from_dict(data).to_dict() == data


def _mutations():
    """(description, mutate(data), phrase the error must contain)."""
    def setk(path, value):
        def f(d):
            obj = d
            for k in path[:-1]:
                obj = obj[k]
            obj[path[-1]] = value
        return f

    def delk(path):
        def f(d):
            obj = d
            for k in path[:-1]:
                obj = obj[k]
            del obj[path[-1]]
        return f

    return [
        ("unknown format version", setk(["format"], "dgate-bundle/3"), "not supported"),
        ("/2 without input.image", setk(["format"], "dgate-bundle/2"), "input.image is missing"),
        ("foreign format", setk(["format"], "something"), "not a dgate-export bundle"),
        ("missing format", delk(["format"]), "not a dgate-export bundle"),
        ("bad precision", setk(["precision"], "int8"), "precision"),
        ("max_batch zero", setk(["max_batch"], 0), "max_batch"),
        ("max_batch bool", setk(["max_batch"], True), "boolean"),
        ("unknown confidence", setk(["confidence"], "vibes"), "confidence"),
        ("missing segments", delk(["segments"]), "segments is missing"),
        ("class names count", setk(["classes", "names"], ["a"]), "classes.names"),
        ("segment out of order", setk(["segments", 1, "index"], 2), "in order"),
        ("path escape", setk(["segments", 0, "file"], "../x.onnx"), "plain file name"),
        ("absolute path", setk(["segments", 0, "engine", "file"], "/etc/passwd"), "plain file name"),
        ("bad sha", setk(["segments", 0, "sha256"], "abc"), "sha256"),
        ("last has a gate", setk(["segments", 2, "gate"], {"exit": "x", "threshold": 1, "head": "linear"}),
         "last segment"),
        ("middle lacks gate", setk(["segments", 1, "gate"], None), "every segment but the last"),
        ("threshold string", setk(["segments", 0, "gate", "threshold"], "0.9"), "threshold"),
        ("carry not chained", setk(["segments", 1, "inputs", 0, "shape"], ["rows", 5, 8, 8]),
         "previous segment's carries"),
        ("carry input named like the output", setk(["segments", 1, "inputs", 0, "name"], "carry_0"),
         "prev_carry"),
        ("index dtype", setk(["segments", 1, "inputs", 1, "dtype"], "float32"), "previous segment's carries"),
        ("logits width", setk(["segments", 0, "outputs", 1, "shape"], ["batch", 4]), "logits"),
        ("no confidence", delk(["segments", 0, "outputs", 2]), "outputs must be"),
        ("fp16 confidence", setk(["segments", 0, "outputs", 2, "dtype"], "float16"), "confidence"),
        ("dtype vs precision", setk(["segments", 0, "outputs", 0, "dtype"], "float16"), "carry_0"),
        ("bad dim", setk(["input", "shape"], ["batch", 0, 8, 8]), "positive integer"),
        ("baseline io", setk(["baseline", "outputs", 0, "name"], "out"), "baseline"),
        ("negative flops", setk(["segments", 0, "flops"], -1), "flops"),
        ("bad std", setk(["input", "normalization", "std"], [0]), "std"),
    ]


@pytest.mark.parametrize("what,mutate,phrase", _mutations(), ids=[m[0] for m in _mutations()])
def test_invalid_manifests_are_refused(tmp_path, what, mutate, phrase):
    data = copy.deepcopy(_sample(tmp_path))
    mutate(data)
    _write(tmp_path, data)
    with pytest.raises(UserError) as info:
        load_manifest(tmp_path)
    assert phrase in str(info.value), str(info.value)
    assert "rebuild" in str(info.value)


def test_write_refuses_invalid(tmp_path):
    m = Manifest.from_dict(_sample(tmp_path))
    m.segments[0].gate.threshold = float("nan")  # type: ignore[union-attr]
    with pytest.raises(UserError, match="threshold"):
        write_manifest(tmp_path, m)
    assert not (tmp_path / "manifest.json").exists()


def test_not_a_bundle(tmp_path):
    with pytest.raises(UserError, match="no manifest.json"):
        load_manifest(tmp_path)
    with pytest.raises(UserError, match="not a bundle directory"):
        load_manifest(tmp_path / "nope")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_manifest(tmp_path)


def test_verify_detects_changed_and_missing_files(tmp_path):
    _write(tmp_path, _sample(tmp_path))
    m = verify_bundle(tmp_path)
    assert {c.status for c in check_files(m)} == {"ok"}
    assert {c.file for c in check_files(m)} == {"segment0.onnx", "segment1.onnx", "segment2.onnx",
                                                 "baseline.onnx"}
    (tmp_path / "segment1.onnx").write_bytes(b"tampered")
    (tmp_path / "baseline.onnx").unlink()
    with pytest.raises(UserError) as info:
        verify_bundle(tmp_path)
    assert "segment1.onnx (mismatch)" in str(info.value)
    assert "baseline.onnx (missing)" in str(info.value)
    assert "segment0.onnx" not in str(info.value)

def test_image_preparation_is_format_2_and_checked(tmp_path):
    """input.image (how image files become input) makes a bundle dgate-bundle/2; without it the bundle
    stays /1, which older readers read; a record that does not give input.shape is refused."""
    from dgate_export.images import ImagePrep
    from dgate_export.manifest import FORMAT_IMAGES

    data = _sample(tmp_path)
    _write(tmp_path, data)
    plain = load_manifest(tmp_path)
    assert plain.input.image is None and plain.to_dict()["format"] == FORMAT and "image" not in plain.to_dict()["input"]
    prep = ImagePrep((8, 8), 9, "L")
    data["format"] = FORMAT_IMAGES
    data["input"]["image"] = prep.to_dict()
    _write(tmp_path, data)
    m = load_manifest(tmp_path)
    assert m.input.image == prep and m.format == FORMAT_IMAGES
    write_manifest(tmp_path, m)
    again = json.loads((tmp_path / "manifest.json").read_text())
    assert again["format"] == FORMAT_IMAGES and again["input"]["image"] == prep.to_dict()
    for bad, phrase in ((dict(prep.to_dict(), color="RGB"), "does not give input.shape"),
                        (dict(prep.to_dict(), size=[8, 7]), "does not give input.shape"),
                        (dict(prep.to_dict(), resize=4), "resize must be")):
        data["input"]["image"] = bad
        _write(tmp_path, data)
        with pytest.raises(UserError, match=phrase):
            load_manifest(tmp_path)
