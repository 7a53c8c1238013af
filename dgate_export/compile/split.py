"""Cut a backbone at named module outputs into ordered segments (torch.fx).

The exit modules are traced as leaves, so each is one `call_module` node; the node list (execution
order) is cut after each exit node. Values that cross a cut are segment outputs and the next segment's
inputs, the exit's output first (the gate's features); skip connections are carried, never recomputed.
Parameters and buffers (`get_attr` nodes) are re-read in each segment that uses them, never carried.
"""

from __future__ import annotations

import difflib

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..contract import INPUT, carry
from ..errors import UserError


class _ExitTracer(fx.Tracer):
    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)


def _check_names(backbone: nn.Module, exits: list[str]) -> None:
    names = [n for n, _ in backbone.named_modules() if n]
    if not exits:
        raise UserError("No exits given.", "Name at least one module output to gate, e.g. --exits layer1,layer2.")
    if len(set(exits)) != len(exits):
        raise UserError(f"Exits {exits} name a module twice.")
    for name in exits:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=4)
            hint = f"Did you mean {', '.join(close)}?" if close else "List the modules with `print(model)`."
            raise UserError(f"Exit {name!r} is not a module of the backbone.", hint)
    for a in exits:
        for b in exits:
            if b.startswith(a + "."):
                raise UserError(f"Exit {b!r} lies inside exit {a!r}.", "Gate at one of them, not both.")


def trace(backbone: nn.Module, exits: list[str]) -> fx.GraphModule:
    _check_names(backbone, exits)
    try:
        graph = _ExitTracer(set(exits)).trace(backbone)
    except Exception as err:  # fx raises many types; all mean "not traceable"
        raise UserError(
            f"The backbone cannot be traced with torch.fx ({type(err).__name__}: {err}).",
            "Data-dependent Python control flow cannot be traced: make that part a module and gate "
            "around it, or rewrite the condition with tensor ops.",
        ) from err
    return fx.GraphModule(backbone, graph)


def split_backbone(
    backbone: nn.Module, exits: list[str], example_input: torch.Tensor
) -> list[fx.GraphModule]:
    """Return len(exits)+1 segments; segment k's forward(*carries) returns a tuple (see module doc)."""
    gm = trace(backbone, list(exits))
    nodes = list(gm.graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UserError(f"The backbone's forward takes {len(placeholders)} inputs; exactly one is supported.")
    with torch.no_grad():
        ShapeProp(gm).propagate(example_input)

    exit_nodes = []
    for name in exits:
        calls = [n for n in nodes if n.op == "call_module" and n.target == name]
        if not calls:
            raise UserError(f"Exit {name!r} never runs in the backbone's forward.", "Choose a module that runs.")
        if len(calls) > 1:
            raise UserError(f"Exit {name!r} runs {len(calls)} times in forward; its output is ambiguous.")
        meta = calls[0].meta.get("tensor_meta")
        if not hasattr(meta, "shape") or len(meta.shape) < 2:
            raise UserError(f"Exit {name!r} does not output one [N, C, ...] tensor.", "Gate at a module that does.")
        exit_nodes.append(calls[0])
    order = sorted(range(len(exits)), key=lambda i: position[exit_nodes[i]])
    if order != list(range(len(exits))):
        raise UserError(
            f"Exits are not in execution order: they run as {[exits[i] for i in order]}.",
            "List them in the order the network runs them.",
        )

    cuts = [position[n] for n in exit_nodes]
    crossings = [_crossing(nodes, position, cut, exit_node) for cut, exit_node in zip(cuts, exit_nodes)]
    for name, cut, exit_node, crossing in zip(exits, cuts, exit_nodes, crossings):
        _check_not_in_branch(name, nodes, position, cut, exit_node, crossing)

    segments = []
    bounds = [-1] + cuts + [len(nodes)]
    for k in range(len(exits) + 1):
        inputs = placeholders if k == 0 else crossings[k - 1]
        body = [n for n in nodes[bounds[k] + 1 : bounds[k + 1] + 1] if n.op not in ("placeholder", "output")]
        outputs = crossings[k] if k < len(exits) else [nodes[-1].args[0]]
        if k == len(exits) and not isinstance(outputs[0], fx.Node):
            raise UserError("The backbone must return one tensor (the class logits).")
        segments.append(_make_segment(gm, inputs, body, outputs))
    return segments


def _crossing(nodes, position, cut, exit_node) -> list[fx.Node]:
    """Values defined at or before `cut` and used after it: the exit's output first."""
    out = [exit_node]
    for node in nodes[: cut + 1]:
        if node is exit_node or node.op == "get_attr":
            continue
        if any(position[u] > cut for u in node.users):
            meta = node.meta.get("tensor_meta")
            if not hasattr(meta, "shape"):
                raise UserError(
                    f"A non-tensor value ({node.name}) crosses the cut after {exit_node.target!r}.",
                    "Gate at another module, or compute that value after the cut.",
                )
            out.append(node)
    return out


def _check_not_in_branch(name, nodes, position, cut, exit_node, crossing) -> None:
    """Refuse a cut that leaves a parallel branch unfinished: every use after the cut of a carried
    value other than the exit's must depend on the exit's output (a skip connection does; the other
    arm of a branch does not)."""
    depends = {exit_node}
    for node in nodes[cut + 1 :]:
        if any(isinstance(a, fx.Node) and a in depends for a in node.all_input_nodes):
            depends.add(node)
    for value in crossing[1:]:
        for user in value.users:
            if position[user] > cut and user not in depends and user.op != "output":
                raise UserError(
                    f"The cut after {name!r} lies inside a branch: {value.name} is still used by "
                    f"{user.name}, which does not depend on {name!r}'s output.",
                    "Gate at the module that joins the branches (or one after it).",
                )


def _make_segment(gm: fx.GraphModule, inputs, body, outputs) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, node in enumerate(inputs):
        env[node] = graph.placeholder(carry(i) if node.op != "placeholder" else INPUT)

    def lookup(node: fx.Node) -> fx.Node:
        if node not in env:
            if node.op != "get_attr":
                raise AssertionError(f"{node.name} is used across a cut but not carried")
            env[node] = graph.get_attr(str(node.target))  # a get_attr node's target is its attribute path
        return env[node]

    for node in body:
        env[node] = graph.node_copy(node, lookup)
    graph.output(tuple(lookup(n) for n in outputs))
    segment = fx.GraphModule(gm, graph)
    segment.eval()
    return segment
