"""FLOP counts per segment and per gate head.

`torch.utils.flop_counter.FlopCounterMode` counts FLOPs = 2 × MACs for convolutions and matrix
products and ignores element-wise ops, pooling and normalisation; every figure in the project is per
sample in that sense (counted at batch 1).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_flops(module: nn.Module, *inputs: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return int(counter.get_total_flops())


def count_gated_flops(gated) -> dict:
    """{"segments": [K+1], "heads": [K], "baseline": int} for one sample."""
    x = torch.zeros(1, *gated.input_shape)
    segments, heads, carries = [], [], (x,)
    for k, segment in enumerate(gated.segments):
        segments.append(count_flops(segment, *carries))
        with torch.no_grad():
            carries = segment(*carries)
        if k < gated.num_gates:
            heads.append(count_flops(gated.heads[k], carries[0]))
    return {"segments": segments, "heads": heads, "baseline": count_flops(gated.backbone, x)}
