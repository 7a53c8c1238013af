"""A tiny hand-made bundle for runtime and backend unit tests (not the build pipeline's output).

Three segments with two gates on 1x8x8 inputs, following docs/architecture.md's ONNX contract, with a
skip connection carried over cut 1 (segment 1 outputs carry_0 and carry_1). Exported with the
TorchScript exporter because it takes a quarter second per graph; the build pipeline's own bundles are
tested in test_runtime_parity.py.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dgate_export.manifest import (
    Baseline,
    Gate,
    InputSpec,
    Manifest,
    Segment,
    TensorSpec,
    sha256_file,
    write_manifest,
)

CLASSES = 3
SHAPE = (1, 8, 8)


def _conf(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=1).amax(dim=1)  # float32 in fp16 bundles too


class Seg0(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, CLASSES)

    def forward(self, x):
        f = torch.relu(self.conv(x))
        logits = self.head(f.mean(dim=(2, 3)))
        return f, logits, _conf(logits)


class Seg1(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, prev0, index):
        skip = prev0.index_select(0, index)
        f = torch.relu(self.conv(skip))
        logits = self.head(f.mean(dim=(2, 3)))
        return f, skip, logits, _conf(logits)


class Seg2(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8 + 4, CLASSES)

    def forward(self, prev0, prev1, index):
        a = prev0.index_select(0, index).mean(dim=(2, 3))
        b = prev1.index_select(0, index).mean(dim=(2, 3))
        return (self.fc(torch.cat([a, b], dim=1)),)


class Baseline_(nn.Module):
    def __init__(self, s0, s1, s2):
        super().__init__()
        self.s0, self.s1, self.s2 = s0, s1, s2

    def forward(self, x):
        f0 = self.s0(x)[0]
        n = torch.arange(x.shape[0])
        f1, skip = self.s1(f0, n)[:2]
        return self.s2(f1, skip, n)[0]


class TinyGated:
    """The torch reference for the tiny bundle: the same early-exit loop as GatedModel.early_exit."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.s0, self.s1, self.s2 = Seg0().eval(), Seg1().eval(), Seg2().eval()

    @torch.no_grad()
    def all_exits(self, x: np.ndarray) -> list[np.ndarray]:
        """Confidence of every sample at gates 0 and 1 (all samples run everything)."""
        t = torch.from_numpy(x)
        n = torch.arange(len(t))
        f0, _, c0 = self.s0(t)
        _, _, _, c1 = self.s1(f0, n)
        return [c0.numpy(), c1.numpy()]

    @torch.no_grad()
    def early_exit(self, x: np.ndarray, thresholds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        t = torch.from_numpy(x)
        n = len(t)
        logits = torch.zeros(n, CLASSES)
        exits = torch.full((n,), 2, dtype=torch.int64)
        conf = torch.zeros(n)
        rows = torch.arange(n)
        f0, lg, c = self.s0(t)
        carries = (f0,)
        for k, seg in enumerate((self.s1, self.s2)):
            leave = c >= thresholds[k]
            logits[rows[leave]] = lg[leave].float()
            exits[rows[leave]] = k
            conf[rows[leave]] = c[leave]
            keep = torch.nonzero(~leave).flatten()
            if keep.numel() == 0:
                return logits.numpy(), exits.numpy(), conf.numpy()
            rows = rows[keep]
            out = seg(*carries, keep)
            if k == 0:
                carries, lg, c = out[:2], out[2], out[3]
        logits[rows] = out[0].float()
        conf[rows] = _conf(out[0])
        return logits.numpy(), exits.numpy(), conf.numpy()


def _spec(name: str, shape: list, dtype: str) -> TensorSpec:
    return TensorSpec(name, shape, dtype)


def make_tiny_bundle(out_dir: Path, *, thresholds=(0.5, 0.5), max_batch: int = 16, precision: str = "fp32",
                     normalization: dict | None = None, seed: int = 0) -> tuple[Path, TinyGated]:
    """Export the tiny model into `out_dir` as an onnxruntime bundle; return (dir, torch reference)."""
    ref = TinyGated(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    d = "float16" if precision == "fp16" else "float32"
    tdt = torch.float16 if precision == "fp16" else torch.float32
    mods = [m.to(tdt) for m in (ref.s0, ref.s1, ref.s2)]
    x = torch.randn(3, *SHAPE, dtype=tdt)
    idx = torch.tensor([0, 2])
    f0 = mods[0](x)[0]
    f1, skip = mods[1](f0, idx)[:2]
    exports = [
        ("segment0.onnx", mods[0], (x,), ["input"], ["carry_0", "logits", "confidence"]),
        ("segment1.onnx", mods[1], (f0, idx), ["prev_carry_0", "index"],
         ["carry_0", "carry_1", "logits", "confidence"]),
        ("segment2.onnx", mods[2], (f1, skip, torch.tensor([1])), ["prev_carry_0", "prev_carry_1", "index"],
         ["logits"]),
        ("baseline.onnx", Baseline_(*mods), (x,), ["input"], ["logits"]),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for file, mod, args, ins, outs in exports:
            axes = {n: {0: "rows" if n.startswith("prev_") else "batch"} for n in ins + outs}
            torch.onnx.export(mod, args, str(out_dir / file), input_names=ins, output_names=outs,
                              dynamic_axes=axes, dynamo=False, opset_version=18)
    # The reference computes in float32 (as GatedModel does); fp16 bundles are compared loosely.
    for m in mods:
        m.float()

    def seg(i, ins, outs, gate):
        f = f"segment{i}.onnx"
        digest = sha256_file(out_dir / f)
        return Segment(i, f, digest, {"file": f, "sha256": digest}, ins, outs, flops=100 * (i + 1), gate=gate)

    conf = _spec("confidence", ["batch"], "float32")
    logits = _spec("logits", ["batch", CLASSES], d)
    segments = [
        seg(0, [_spec("input", ["batch", *SHAPE], d)], [_spec("carry_0", ["batch", 4, 8, 8], d), logits, conf],
            Gate("g0", float(thresholds[0]), "linear", 15)),
        seg(1, [_spec("prev_carry_0", ["rows", 4, 8, 8], d), _spec("index", ["batch"], "int64")],
            [_spec("carry_0", ["batch", 8, 4, 4], d), _spec("carry_1", ["batch", 4, 8, 8], d), logits, conf],
            Gate("g1", float(thresholds[1]), "linear", 27)),
        seg(2, [_spec("prev_carry_0", ["rows", 8, 4, 4], d), _spec("prev_carry_1", ["rows", 4, 8, 8], d),
                _spec("index", ["batch"], "int64")], [logits], None),
    ]
    base_sha = sha256_file(out_dir / "baseline.onnx")
    manifest = Manifest(
        name="tiny", created="2026-11-25T20:00:00Z", backend="onnxruntime", precision=precision,
        max_batch=max_batch,
        input=InputSpec("input", ["batch", *SHAPE], d, "NCHW", normalization),
        num_classes=CLASSES, class_names=["a", "b", "c"], confidence="max-softmax", segments=segments,
        baseline=Baseline("baseline.onnx", base_sha, {"file": "baseline.onnx", "sha256": base_sha},
                          [_spec("input", ["batch", *SHAPE], d)], [logits], flops=600),
        tools={}, backend_info={}, opset=18,
    )
    write_manifest(out_dir, manifest)
    return out_dir, ref
