"""Blocks of an observed graph (FX or PT2E student) for block-wise reconstruction, found from the graph.

A block ends where the whole network state is one quantized tensor: an activation fake-quant
node that every path from the input to the output passes through (in a ResNet, the output of
each residual block, of the stem and of the pooling). Cutting there gives BRECQ's blocks without
knowing the model's module names, and the same on torch.ao FX and torchao PT2E graphs.
A segment with no weights (pooling, reshapes) is merged into the next one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn


@dataclass
class Block:
    """Nodes ``(start, end]`` of the graph: ``start`` is the block's input (a cut point or the graph
    input), ``end`` its output; ``nodes`` what must run to get ``end`` from ``start``."""

    index: int
    start: fx.Node
    end: fx.Node
    nodes: list[fx.Node]
    modules: list[str]  # call_module targets inside (fake-quants, QAT convs)
    attrs: list[str]  # get_attr targets inside (PT2E weights and BN parameters)

    @property
    def name(self) -> str:
        return f"block {self.index} ({self.start.name} -> {self.end.name})"


def _depends_on_input(graph: fx.Graph) -> set[fx.Node]:
    live: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(a in live for a in node.all_input_nodes):
            live.add(node)
    return live


def _is_activation_fake_quant(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_module":
        return False
    module = gm.get_submodule(str(node.target))
    return hasattr(module, "calculate_qparams") and hasattr(module, "fake_quant_enabled")


def _has_layer_weights(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A layer with parameters of its own (a learnable fake-quant's scale does not count)."""
    module = gm.get_submodule(str(node.target))
    return not hasattr(module, "fake_quant_enabled") and any(True for _ in module.parameters())


def cut_points(gm: fx.GraphModule) -> list[fx.Node]:
    """Activation fake-quant nodes through which the whole state passes, in graph order."""
    acts = _depends_on_input(gm.graph)
    order = [n for n in gm.graph.nodes if n in acts and n.op != "output"]
    position = {n: i for i, n in enumerate(order)}
    last_use = {n: max((position.get(u, len(order)) for u in n.users), default=position[n]) for n in order}
    cuts = []
    for i, node in enumerate(order):
        live = [m for m in order[: i + 1] if last_use[m] > i]
        if live == [node] and _is_activation_fake_quant(gm, node):
            cuts.append(node)
    return cuts


def _needed(start: fx.Node, end: fx.Node) -> set[fx.Node]:
    """``end``'s ancestors, not looking past ``start``."""
    seen: set[fx.Node] = set()
    stack = [end]
    while stack:
        n = stack.pop()
        if n in seen or n is start:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def find_blocks(gm: fx.GraphModule) -> list[Block]:
    """The graph's reconstruction blocks, input to output."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ValueError(f"block reconstruction needs a single-input graph, this one has {len(placeholders)}")
    output = next(n for n in gm.graph.nodes if n.op == "output")
    final = output.args[0]
    if isinstance(final, (tuple, list)) and len(final) == 1:  # torch.export graphs return a 1-tuple
        final = final[0]
    if not isinstance(final, fx.Node):
        raise TypeError("block reconstruction needs a graph that returns a single tensor")
    ends = [c for c in cut_points(gm) if c is not final] + [final]
    blocks: list[Block] = []
    start = placeholders[0]
    pending_start = start
    for end in ends:
        needed = _needed(pending_start, end)
        if placeholders[0] in needed and pending_start is not placeholders[0]:
            raise ValueError(f"{end.name} depends on the input past the cut at {pending_start.name}")
        order = [n for n in gm.graph.nodes if n in needed]
        has_weights = any(n.op == "get_attr" or (n.op == "call_module" and _has_layer_weights(gm, n)) for n in order)
        if not has_weights and end is not final:
            continue  # merge a weightless segment (pooling, reshape) into the next block
        blocks.append(Block(len(blocks), pending_start, end, order,
                            [str(n.target) for n in order if n.op == "call_module"],
                            [str(n.target) for n in order if n.op == "get_attr"]))
        pending_start = end
    return blocks


class BlockRunner(fx.Interpreter):
    """Runs one block of a GraphModule on a given input tensor (its ``start`` node's value)."""

    def __init__(self, gm: fx.GraphModule, block: Block) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.block = block

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.env = {self.block.start: x}
        for node in self.block.nodes:
            self.env[node] = self.run_node(node)
        out = self.env[self.block.end]
        self.env = {}
        return out


def owner_and_attr(gm: nn.Module, target: str) -> tuple[nn.Module, str]:
    """The module holding a get_attr target (``"conv1.weight"``) and the attribute's name."""
    owner_name, _, attr = target.rpartition(".")
    return (gm.get_submodule(owner_name) if owner_name else gm), attr


def block_parameters(gm: fx.GraphModule, block: Block) -> list[nn.Parameter]:
    """Trainable parameters the block reads: QAT modules' and get_attr weights (not BN running stats)."""
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    for target in block.modules:
        for p in gm.get_submodule(target).parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    for target in block.attrs:
        p = getattr(*owner_and_attr(gm, target))
        if isinstance(p, nn.Parameter) and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


__all__ = ["Block", "BlockRunner", "block_parameters", "cut_points", "find_blocks", "owner_and_attr"]
