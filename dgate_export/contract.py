"""The segment contract: the one owner of the names and values that export, build, the manifest, the
runtime and the benchmarks must agree on (docs/architecture.md, "The ONNX contract of a segment").

Standard library only (no numpy, no torch), so that anything may import it, `--help` included.

    segment 0        input                                   -> carry_0..carry_{m-1}, logits, confidence
    segment 0<k<K    prev_carry_0..prev_carry_{m-1}, index    -> carry_0..,             logits, confidence
    segment K        prev_carry_0.., index                    -> logits
    baseline         input                                   -> logits
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

INPUT = "input"            # segment 0's (and the baseline's) model input [batch, C, H, W]
INDEX = "index"            # segment k>0: int64 [batch], rows of the previous segment's batch to keep
LOGITS = "logits"          # class scores [batch, classes]
CONFIDENCE = "confidence"  # float32 [batch], the confidence measure computed in the graph
CARRY = "carry_"           # carry_i: a tensor crossing the cut (carry_0 = the gate's features)
# Segment k>0's input fed from segment k-1's output carry_i is named prev_carry_i: an ONNX graph cannot
# have an input and an output of the same name (SSA), and segment k>0 outputs its own carry_i.
CARRY_IN_PREFIX = "prev_"

HOST_OUTPUTS = frozenset({LOGITS, CONFIDENCE})  # what the runtime loop reads; carries may stay on device

# The confidence measures (numpy: confidence.py, torch: compile/heads.py, and in the exported graphs).
CONFIDENCES = ("max-softmax", "margin", "entropy")
DEFAULT_CONFIDENCE = "max-softmax"

# A threshold above every confidence (all confidences lie in [0, 1]): the gate never lets a sample leave.
# Finite, so that it can be written to a manifest or JSON and passes the runtime's threshold checks.
NEVER_EXIT = 1.01
ALWAYS_EXIT = -1.0  # below every confidence: every sample reaching the gate leaves there


def exit_at(k: int, num_gates: int) -> list[float]:
    """Thresholds that send every sample out at exit k (k = num_gates: through every segment)."""
    return [ALWAYS_EXIT if j == k else NEVER_EXIT for j in range(num_gates)]


def carry(i: int) -> str:
    """The name of a segment's i-th carry output."""
    return f"{CARRY}{i}"


def carry_in(i: int) -> str:
    """The name of segment k>0's input fed by segment k-1's output carry_i."""
    return CARRY_IN_PREFIX + carry(i)


def is_carry(name: str) -> bool:
    return name.startswith(CARRY)


def carry_links(input_names: Iterable[str]) -> list[tuple[str, str]]:
    """(input name, previous segment's output name) for each carry among a segment's inputs."""
    return [(name, name[len(CARRY_IN_PREFIX):]) for name in input_names if name.startswith(CARRY_IN_PREFIX)]


def batch_input(input_names: Iterable[str]) -> str:
    """The input whose rows are a segment's batch: `index` in segments k>0 (their carries hold the
    previous segment's rows), else `input`. Backends get it as the `batch_input` runner option."""
    return INDEX if INDEX in list(input_names) else INPUT


def segment_inputs(k: int, num_carries_in: int) -> list[str]:
    """Input names of segment k, taking `num_carries_in` carries from segment k-1 when k > 0."""
    return [INPUT] if k == 0 else [carry_in(i) for i in range(num_carries_in)] + [INDEX]


def segment_outputs(last: bool, num_carries: int) -> list[str]:
    """Output names of a segment: the last has only logits; the others carries, logits and confidence."""
    return [LOGITS] if last else [carry(i) for i in range(num_carries)] + [LOGITS, CONFIDENCE]


def exit_costs(segment_flops: Sequence[float], head_flops: Sequence[float]) -> list[float]:
    """Cost per sample of leaving at exit k (k = 0..K): segments 0..k plus heads 0..k (K heads)."""
    if len(segment_flops) != len(head_flops) + 1:
        raise ValueError(f"{len(segment_flops)} segment costs for {len(head_flops)} heads (need K+1 and K)")
    costs, total = [], 0.0
    for k, seg in enumerate(segment_flops):
        total += float(seg) + (float(head_flops[k]) if k < len(head_flops) else 0.0)
        costs.append(total)
    return costs


def expected_cost(costs: Sequence[float], exit_fractions: Sequence[float]) -> float:
    """Expected cost per sample when exit_fractions[k] of the samples leave at exit k."""
    if len(costs) != len(exit_fractions):
        raise ValueError(f"{len(exit_fractions)} exit fractions for {len(costs)} exits")
    return float(sum(float(f) * float(c) for f, c in zip(exit_fractions, costs)))
