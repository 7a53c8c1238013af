"""The gated model: a backbone split into segments, one d-gate head per cut, thresholds.

`forward` returns every exit's logits (training, evaluation, calibration). `early_exit` is the
reference early-exit pass: it really compacts the batch between segments, exactly as the runtime does,
and is the oracle every backend is checked against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ..contract import DEFAULT_CONFIDENCE, NEVER_EXIT, exit_costs, expected_cost
from ..errors import UserError
from .heads import (
    LAYOUT_HELP,
    GateHead,
    check_confidence,
    check_layout,
    confidence_torch,
    detect_layouts,
    make_head,
)
from .split import split_backbone


@dataclass
class EarlyExit:
    logits: torch.Tensor  # [N, classes], from the exit each sample took
    exits: torch.Tensor  # int64 [N]: 0..K-1 for the gates, K for the backbone's own classifier
    confidence: torch.Tensor  # [N], the confidence at the exit taken


class GatedModel(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        exits: list[str],
        *,
        arch: dict,
        num_classes: int,
        input_shape: tuple[int, int, int],
        head: str = "linear",
        head_kwargs: dict | None = None,
        confidence: str = DEFAULT_CONFIDENCE,
        thresholds: list[float] | None = None,
        class_names: list[str] | None = None,
        normalization: dict | None = None,
        flops: dict | None = None,
        data_split: dict | None = None,
        feature_layout: str | list[str] = "auto",
    ):
        super().__init__()
        self.backbone = backbone.eval()
        self.exits = list(exits)
        self.arch = {"name": arch["name"], "kwargs": dict(arch.get("kwargs") or {})}
        self.head_spec: dict[str, Any] = {"name": head, "kwargs": dict(head_kwargs or {})}
        self.confidence = check_confidence(confidence)
        self.num_classes = int(num_classes)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.class_names = list(class_names) if class_names else None
        self.normalization = normalization
        # How image files become input (images.ImagePrep's dict) when the gates were trained on an image
        # folder; None otherwise. Set by the gate pipeline, recorded in the checkpoint and the manifest.
        self.image: dict | None = None
        self.flops = flops
        # The validation split the gates were trained without ({"data", "val_size", "seed"}): calibrate
        # must choose thresholds on those rows, never on rows the gates saw.
        self.data_split = dict(data_split) if data_split else None
        example = torch.zeros(2, *self.input_shape)
        self.segments = nn.ModuleList(split_backbone(self.backbone, self.exits, example))
        with torch.no_grad():
            carries = self.run_segments(example)
        out = carries[-1][0]
        if out.dim() != 2 or out.shape[1] != self.num_classes:
            raise UserError(
                f"The backbone outputs shape {list(out.shape[1:])} per sample, not {self.num_classes} class scores.",
                "Set num_classes in --arch-kwargs to match the data.",
            )
        shapes = [tuple(int(d) for d in c[0].shape[1:]) for c in carries[:-1]]
        self.feature_layouts = self._layouts(feature_layout, shapes, example)
        self.heads: nn.ModuleList = nn.ModuleList(
            make_head(head, shape, self.num_classes, layout, **self.head_spec["kwargs"])
            for shape, layout in zip(shapes, self.feature_layouts)
        )
        self.thresholds = list(thresholds) if thresholds is not None else [NEVER_EXIT] * self.num_gates
        if len(self.thresholds) != self.num_gates:
            raise UserError(f"{len(self.thresholds)} thresholds given for {self.num_gates} gates.")
        self.eval()

    def _layouts(self, given: str | list[str], shapes: list[tuple[int, ...]], example: torch.Tensor) -> list[str]:
        """Each exit's output layout: given (one for all exits, or one per exit), or "auto": detected from
        the exit's modules (gates.detect_layouts), else from a square image's shape; else refused."""
        layouts = [given] * self.num_gates if isinstance(given, str) else list(given)
        if len(layouts) != self.num_gates:
            raise UserError(f"{len(layouts)} feature layouts given for {self.num_gates} exits.",
                            "Give one layout for all exits, or one per exit.")
        detected = detect_layouts(self.backbone, self.exits, example) if "auto" in layouts else []
        for k, layout in enumerate(layouts):
            if layout != "auto":
                check_layout(layout, shapes[k], f"exit {self.exits[k]!r}")
                continue
            found = detected[k] or _square_layout(shapes[k], self.input_shape)
            if found is None:
                raise UserError(
                    f"Cannot tell the layout of exit {self.exits[k]!r}'s output [N, {', '.join(map(str, shapes[k]))}]: "
                    "its modules do not show where the channels are.",
                    f"Pass --feature-layout ({LAYOUT_HELP}), or gate at another module.")
            layouts[k] = found
        return layouts

    @classmethod
    def attach(cls, backbone: nn.Module, exits: list[str], **kwargs) -> GatedModel:
        """Attach fresh gate heads at `exits` (same keywords as the constructor)."""
        return cls(backbone, exits, **kwargs)

    @property
    def num_gates(self) -> int:
        return len(self.exits)

    def run_segments(self, x: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        outs, carries = [], (x,)
        for segment in self.segments:
            carries = segment(*carries)
            outs.append(carries)
        return outs

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        carries = self.run_segments(x)
        return [head(c[0]) for head, c in zip(self.heads, carries)] + [carries[-1][0]]

    def gate_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        carries = self.run_segments(x)
        heads = cast(list[GateHead], list(self.heads))
        return [head.pool(c[0]) for head, c in zip(heads, carries)], carries[-1][0]

    @torch.no_grad()
    def early_exit(self, x: torch.Tensor, thresholds: list[float] | None = None) -> EarlyExit:
        thresholds = self.thresholds if thresholds is None else list(thresholds)
        if len(thresholds) != self.num_gates:
            raise UserError(f"{len(thresholds)} thresholds given for {self.num_gates} gates.")
        n = x.shape[0]
        logits = torch.zeros(n, self.num_classes, dtype=x.dtype)
        exits = torch.full((n,), self.num_gates, dtype=torch.int64)
        confidence = torch.zeros(n)
        rows = torch.arange(n)
        carries: tuple[torch.Tensor, ...] = (x,)
        for k, segment in enumerate(self.segments):
            carries = segment(*carries)
            if k == self.num_gates:
                logits[rows] = carries[0]
                confidence[rows] = confidence_torch(self.confidence, carries[0])
                break
            gate_logits = self.heads[k](carries[0])
            conf = confidence_torch(self.confidence, gate_logits)
            leave = conf >= thresholds[k]
            logits[rows[leave]] = gate_logits[leave]
            exits[rows[leave]] = k
            confidence[rows[leave]] = conf[leave]
            keep = torch.nonzero(~leave).flatten()
            if keep.numel() == 0:
                break
            rows = rows[keep]
            carries = tuple(c.index_select(0, keep) for c in carries)
        return EarlyExit(logits, exits, confidence)

    def count_flops(self) -> dict:
        from .flops import count_gated_flops

        self.flops = count_gated_flops(self)
        return self.flops

    def exit_costs(self) -> list[float]:
        """FLOPs per sample of leaving at exit k (segments 0..k and heads 0..k)."""
        flops = self.flops or self.count_flops()
        return exit_costs(flops["segments"], flops["heads"])

    def expected_cost(self, exit_fractions) -> float:
        """Expected FLOPs per sample when `exit_fractions[k]` of the samples leave at exit k."""
        return expected_cost(self.exit_costs(), exit_fractions)


def _square_layout(shape: tuple[int, ...], input_shape: tuple[int, ...]) -> str | None:
    """For square images: a 4-D output whose last two axes are equal (and not the first) is NCHW, one
    whose first two are equal (and not the last) is NHWC; anything else is undecided (None)."""
    if len(shape) != 3 or len(input_shape) != 3 or input_shape[1] != input_shape[2]:
        return None
    a, b, c = shape
    if b == c != a:
        return "nchw"
    if a == b != c:
        return "nhwc"
    return None
