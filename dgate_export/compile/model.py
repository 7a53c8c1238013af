"""The gated model: a backbone split into segments, one d-gate head per cut, thresholds.

`forward` returns every exit's logits (training, evaluation, calibration). `early_exit` is the
reference early-exit pass: it really compacts the batch between segments, exactly as the runtime does,
and is the oracle every backend is checked against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ..contract import DEFAULT_CONFIDENCE, NEVER_EXIT, exit_costs, expected_cost
from ..errors import UserError
from .heads import (
    LAYOUT_HELP,
    CustomHead,
    GateHead,
    build_head,
    check_confidence,
    check_layout,
    confidence_torch,
    detect_layouts,
    head_info,
    is_gate_head_factory,
    registered_name,
    wrap_head,
)
from .split import split_backbone


@dataclass
class _HeadChoice:
    """One exit's head, before it is built: a module given, or a factory and its arguments."""
    name: str  # recorded in checkpoints and manifests
    kwargs: dict[str, Any]
    factory: Callable[..., nn.Module] | None
    module: nn.Module | None

    @property
    def layered(self) -> bool:
        """Whether the head takes the exit's output in a channels-first layout (a GateHead) or raw."""
        return isinstance(self.module, GateHead) if self.module is not None else is_gate_head_factory(self.factory)

    def build(self, shape: tuple[int, ...], num_classes: int, layout: str) -> GateHead:
        if self.module is not None:
            return wrap_head(self.module, layout)
        assert self.factory is not None
        return build_head(self.factory, self.name, shape, num_classes, layout, **self.kwargs)


def _head_choices(head: Any, head_kwargs: dict | Sequence[dict] | None, exits: list[str]) -> list[_HeadChoice]:
    """`head` and `head_kwargs` (GatedModel's doc) as one _HeadChoice per exit."""
    n = len(exits)
    if isinstance(head_kwargs, list | tuple):
        kwargs_list = [dict(k or {}) for k in head_kwargs]
    else:
        kwargs_list = [dict(cast(dict, head_kwargs) or {}) for _ in range(n)]
    if len(kwargs_list) != n:
        raise UserError(f"{len(kwargs_list)} head_kwargs given for {n} exits.", "Give one dict for all, or one per exit.")
    if isinstance(head, nn.Module):
        if n != 1:
            raise UserError(f"One head module given for {n} exits.",
                            "Give one head module per exit (a list), or a factory: a class or function called as "
                            "factory(in_shape, num_classes) for each exit.")
        head = [head]
    items = list(head) if isinstance(head, list | tuple) else [head] * n
    if len(items) != n:
        raise UserError(f"{len(items)} heads given for {n} exits ({', '.join(exits)}).", "Give one head per exit.")
    choices = []
    seen: dict[int, str] = {}
    for exit_name, item, kwargs in zip(exits, items, kwargs_list):
        if isinstance(item, str):
            choices.append(_HeadChoice(item, kwargs, head_info(item).factory, None))
        elif isinstance(item, nn.Module):
            if id(item) in seen:
                raise UserError(f"The same head module is given for exits {seen[id(item)]!r} and {exit_name!r}.",
                                "Give each exit its own head module, or a factory that makes one per exit.")
            seen[id(item)] = exit_name
            choices.append(_HeadChoice(registered_name(item) or type(item).__name__, kwargs, None, item))
        elif callable(item):
            name = registered_name(item) or str(getattr(item, "__name__", type(item).__name__))
            choices.append(_HeadChoice(name, kwargs, item, None))
        else:
            raise UserError(f"The head for exit {exit_name!r} is a {type(item).__name__}.",
                            "Give a head name (linear, mlp, grid or a registered one), an nn.Module, or a factory "
                            "called as factory(in_shape, num_classes).")
    return choices


def _check_heads(model: GatedModel, features: list[torch.Tensor]) -> None:
    """Every head on its exit's output (the example batch): [N, classes] out, and for custom heads the
    pool / classify split (what training caches) composing to the module's forward."""
    n = features[0].shape[0]
    for k, (head, feats) in enumerate(zip(model.heads, features)):
        where = f"The gate head at exit {model.exits[k]!r} ({model.head_specs[k]['name']})"
        shape = f"[N, {', '.join(str(d) for d in feats.shape[1:])}]"
        try:
            with torch.no_grad():
                logits = head(feats)
        except Exception as err:  # a user's module fails in many ways (shapes, dtypes)
            raise UserError(f"{where} fails on the exit's output {shape}: {_first_line(err)}",
                            "Size the head for that output (a head factory gets in_shape, the exit's output shape "
                            "per sample), or gate at another module.") from err
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (n, model.num_classes):
            got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise UserError(f"{where} maps the exit's output {shape} to {got}, not [N, {model.num_classes}] "
                            "class scores.", f"Make the head output one score per class ({model.num_classes}).")
        if isinstance(head, CustomHead):
            with torch.no_grad():
                split = head.classify(head.pool(feats))
            if split.shape != logits.shape or not torch.allclose(split, logits, rtol=1e-4, atol=1e-5):
                raise UserError(f"{where}: classify(pool(x)) differs from forward(x); training caches pool(x) "
                                "and trains classify, so they must compose to forward.",
                                "Fix the module's pool / classify methods, or remove them (the exit's output is "
                                "then cached whole).")


def _check_cpu(backbone: nn.Module) -> None:
    devices = {p.device.type for p in backbone.parameters()} | {b.device.type for b in backbone.buffers()}
    if devices - {"cpu"}:
        raise UserError(f"The backbone's weights are on {', '.join(sorted(devices - {'cpu'}))}; gating runs on the CPU.",
                        "Move the model to the CPU first: model.cpu().")


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


@dataclass
class EarlyExit:
    logits: torch.Tensor  # [N, classes], from the exit each sample took
    exits: torch.Tensor  # int64 [N]: 0..K-1 for the gates, K for the backbone's own classifier
    confidence: torch.Tensor  # [N], the confidence at the exit taken


class GatedModel(nn.Module):
    """A backbone split at `exits`, one gate head per exit, and the thresholds.

    `head`: a head name (built in: linear, mlp, grid; or registered with heads.register_head), a head
    factory (a class or function called as factory(in_shape, num_classes, **head_kwargs) per exit), or one
    head per exit, each a name or an nn.Module of the user's (used as it is, trained or not: any module
    mapping the exit's output to [N, classes]). `head_kwargs`: one dict for all exits or one per exit.
    `num_classes` None: the backbone's output width. Every head is tried on the exit's output here, so a
    head that does not fit is refused (UserError naming the exit) before any training."""

    def __init__(
        self,
        backbone: nn.Module,
        exits: list[str],
        *,
        arch: dict,
        num_classes: int | None,
        input_shape: tuple[int, int, int],
        head: Any = "linear",
        head_kwargs: dict | Sequence[dict] | None = None,
        confidence: str = DEFAULT_CONFIDENCE,
        thresholds: list[float] | None = None,
        class_names: list[str] | None = None,
        normalization: dict | None = None,
        flops: dict | None = None,
        data_split: dict | None = None,
        feature_layout: str | list[str] = "auto",
    ):
        super().__init__()
        _check_cpu(backbone)
        self.backbone = backbone.eval()
        self.exits = list(exits)
        self.arch = {"name": arch["name"], "kwargs": dict(arch.get("kwargs") or {})}
        self.confidence = check_confidence(confidence)
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
        # How the thresholds were calibrated (calibrate.calibration_record: the target, the validation exit
        # mix), or None; set by the gate pipeline and kept by the checkpoint.
        self.calibration: dict | None = None
        example = torch.zeros(2, *self.input_shape)
        self.segments = nn.ModuleList(split_backbone(self.backbone, self.exits, example))
        with torch.no_grad():
            carries = self.run_segments(example)
        out = carries[-1][0]
        if num_classes is None and out.dim() == 2:
            num_classes = int(out.shape[1])
        self.num_classes = int(num_classes) if num_classes is not None else -1
        if out.dim() != 2 or out.shape[1] != self.num_classes:
            raise UserError(
                f"The backbone outputs shape {list(out.shape[1:])} per sample, not "
                f"{self.num_classes if num_classes is not None else 'a vector of'} class scores.",
                "Set num_classes in --arch-kwargs to match the data (in Python: build the model for it).",
            )
        shapes = [tuple(int(d) for d in c[0].shape[1:]) for c in carries[:-1]]
        choices = _head_choices(head, head_kwargs, self.exits)
        self.head_specs: list[dict[str, Any]] = [{"name": c.name, "kwargs": c.kwargs} for c in choices]
        self.feature_layouts = self._layouts(feature_layout, shapes, example, [c.layered for c in choices])
        self.heads: nn.ModuleList = nn.ModuleList(
            c.build(shape, self.num_classes, layout) for c, shape, layout in zip(choices, shapes, self.feature_layouts))
        self.thresholds = list(thresholds) if thresholds is not None else [NEVER_EXIT] * self.num_gates
        if len(self.thresholds) != self.num_gates:
            raise UserError(f"{len(self.thresholds)} thresholds given for {self.num_gates} gates.")
        self.eval()
        _check_heads(self, [c[0] for c in carries[:-1]])

    @property
    def head_spec(self) -> dict[str, Any]:
        """The heads' {"name", "kwargs"}: the one all exits share, else the names joined, kwargs per exit."""
        first = self.head_specs[0]
        if all(spec == first for spec in self.head_specs):
            return first
        return {"name": ",".join(spec["name"] for spec in self.head_specs),
                "kwargs": [spec["kwargs"] for spec in self.head_specs]}

    def _layouts(self, given: str | list[str], shapes: list[tuple[int, ...]], example: torch.Tensor,
                 layered: list[bool]) -> list[str]:
        """Each exit's output layout: given (one for all exits, or one per exit), or "auto": detected from
        the exit's modules (gates.detect_layouts), else from a square image's shape; else refused. An exit
        whose head is a custom module (not a GateHead) gets its output as it is: "raw"."""
        layouts = [given] * self.num_gates if isinstance(given, str) else list(given)
        if len(layouts) != self.num_gates:
            raise UserError(f"{len(layouts)} feature layouts given for {self.num_gates} exits.",
                            "Give one layout for all exits, or one per exit.")
        needed = [k for k in range(self.num_gates) if layered[k] and layouts[k] == "auto"]
        detected = detect_layouts(self.backbone, self.exits, example) if needed else []
        for k, layout in enumerate(layouts):
            if not layered[k]:
                if layout not in ("auto", "raw"):
                    raise UserError(f"Feature layout {layout!r} given for exit {self.exits[k]!r}, whose head is a "
                                    "custom module: it gets the exit's output as it is.",
                                    "Leave the layout at auto for custom heads (layouts apply to the built-in heads).")
                layouts[k] = "raw"
                continue
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
