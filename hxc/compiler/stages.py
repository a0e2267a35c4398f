"""Cutting an exported program into consecutive stages (`hxc compile --stages`).

Where to cut:
  at:NAME,...  before each named submodule (its qualified name: `layer3`, `blocks.6`),
               at its first node in the exported graph;
  N            N-1 cuts among the model's module boundaries, chosen so that the
               heaviest stage's FLOPs are as few as they can be;
  auto         AUTO_STAGES (2) stages, cut as for N: placement by measurement
               (issue 29, part 2) will choose how many.

Module boundaries come from the exported nodes' `nn_module_stack`. A node's *block* is
the outermost module on its stack (below the root) that is not a group of repeated
blocks; a group — a module with two or more children of one type that have children
of their own: resnet's `layer1` of BasicBlocks, an encoder's `layers` or a Sequential of
Sequential blocks (a ModuleList itself never appears on a stack) — is looked through, so
its blocks are the units. Nodes of a group's own forward (or the root's) belong to no
block. A boundary is the first node of a block such that no block has nodes on both
sides of it. A graph with fewer than two blocks is cut between any nodes instead.
Cuts that would pass a value other than a tensor (a shape, a tuple) are never chosen.

A language model is not cut here: `CausalLM.hxc_stages` (`hxc.compiler.causal_lm`)
cuts it at its decoder layers for the same request, balanced with `balanced_cuts`.

FLOPs per node, from the shapes recorded on the exported graph (nothing runs): the
formulas of `torch.utils.flop_counter` for the ops it knows (mm, addmm, bmm, convolution,
attention), 2 x output elements x reduced size for linear, matmul and convolutions in
their un-decomposed export form, and one per output element for every other op. The
estimate balances the cut and is recorded per stage; it is not a measurement.

How: each stage is a new fx graph of its nodes. Every tensor that crosses a cut — the
activations, and anything used further on, a skip connection included — is an output
of the stage before the cut and an input of the stage after it, so each stage's inputs
are exactly the previous stage's outputs (a value used two stages later passes through
the stage between). A stage holds only the parameters and buffers its own nodes read,
under the model's own names. Each stage is then exported again by torch.export and
imported like a whole model (`torch_import`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

from hxc.errors import LoweringError, UsageError

AUTO_STAGES = 2
MAX_STAGES = 64
_GUARDS = "_guards_fn"  # the input-guard module torch.export's unlifted program calls first
# Node-level cuts of a graph without blocks: the balance search looks at most at this
# many candidate positions (spread evenly over the FLOPs).
_MAX_CANDIDATES = 256


@dataclass(frozen=True)
class StageRequest:
    """What `--stages` asked for: `count` stages, or cuts before the modules `at`."""

    text: str
    count: int = 0
    at: tuple[str, ...] = ()


def parse_stages(text: str) -> StageRequest:
    """`auto`, `N` (2 or more) or `at:NAME[,NAME...]`; a one-line UsageError otherwise."""
    t = text.strip()
    if t == "auto":
        return StageRequest(t, AUTO_STAGES)
    if t.startswith("at:"):
        names = tuple(n.strip() for n in t[3:].split(","))
        if not all(names):
            raise UsageError(f"--stages {text}: name the submodules to cut before, e.g. at:layer3 or at:blocks.4,blocks.8")
        if len(set(names)) != len(names):
            raise UsageError(f"--stages {text}: a submodule is named twice")
        if len(names) + 1 > MAX_STAGES:
            raise UsageError(f"--stages {text}: at most {MAX_STAGES} stages")
        return StageRequest(t, 0, names)
    if t.isdigit():
        n = int(t)
        if not 2 <= n <= MAX_STAGES:
            raise UsageError(f"--stages {t}: a model is cut into 2 to {MAX_STAGES} stages",
                             hint="leave --stages out to compile it whole")  # fmt: skip
        return StageRequest(t, n)
    raise UsageError(f"--stages {text!r}: expected auto, a number of stages or at:NAME[,NAME...]")


@dataclass
class StagePart:
    """One stage of a cut program: a module to export, its example inputs (what the
    stages before it compute on the model's example inputs), and what the manifest
    records of it."""

    index: int
    module: torch.fx.GraphModule
    example_args: tuple[torch.Tensor, ...]
    dynamic_shapes: tuple[dict[int, Any], ...] | None
    inputs: tuple[str, ...]  # the crossing values' names (graph node names), in order
    outputs: tuple[str, ...]
    first_module: str | None
    last_module: str | None
    flops: int
    weights_bytes: int

    @property
    def name(self) -> str:
        return f"s{self.index}"


def split_program(program: torch.export.ExportedProgram, example_args: tuple[torch.Tensor, ...], request: StageRequest,
                  source: str) -> list[StagePart]:  # fmt: skip
    """`program` cut as `request` asks, each stage a module of its own (see the module's
    docstring); UsageError when the request cannot be met."""
    gm = program.module()
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    output = next(n for n in nodes if n.op == "output")
    compute = [n for n in nodes if n.op in ("call_function", "call_method")
               or (n.op == "call_module" and n.target != _GUARDS)]  # fmt: skip
    if len(compute) < 2:
        raise UsageError(f"{source}: the program has {len(compute)} operation(s); there is nothing to cut")
    graph = _Graph(placeholders, compute, output)
    blocks = _blocks(compute)
    if request.at:
        cuts = _named_cuts(graph, request, source)
    else:
        module_level = len({b for b in blocks if b is not None}) >= 2
        candidates = _module_cuts(graph, blocks) if module_level else graph.tensor_cuts(range(1, len(compute)))
        if len(candidates) + 1 < request.count:
            what = (f"{len(candidates) + 1} block(s) at its module boundaries" if module_level
                    else f"{len(candidates) + 1} place(s) it can be cut between operations")  # fmt: skip
            raise UsageError(f"--stages {request.count}: {source} has {what}; it can be cut into at most "
                             f"{len(candidates) + 1} stages", hint="ask for fewer, or name the cuts with at:NAME,...")  # fmt: skip
        flops = [node_flops(n) for n in compute]
        cuts = balanced_cuts(candidates, flops, request.count)
    return _parts(gm, graph, blocks, cuts, example_args)


# --- the graph and its cuts ----------------------------------------------------------


class _Graph:
    """The program's nodes in order, and for each value the span over which it is
    alive: a value crosses the cut before compute node `i` when it was made before
    `i` (graph inputs first of all) and is used at or after it (or is an output)."""

    def __init__(self, placeholders: list[torch.fx.Node], compute: list[torch.fx.Node], output: torch.fx.Node) -> None:
        self.placeholders, self.compute, self.output = placeholders, compute, output
        self.position = {n: i for i, n in enumerate(compute)} | {p: -1 for p in placeholders}
        end = len(compute)
        self.last_use: dict[torch.fx.Node, int] = {}
        for value in (*placeholders, *compute):
            uses = [end if u is output else self.position.get(u, -1) for u in value.users]
            self.last_use[value] = max(uses, default=-1)
        self.outputs = [x for x in pytree.tree_leaves(output.args[0]) if isinstance(x, torch.fx.Node)]

    def crossing(self, cut: int) -> list[torch.fx.Node]:
        """The values that cross the cut before compute node `cut`, in graph order."""
        return [v for v in (*self.placeholders, *self.compute) if self.position[v] < cut <= self.last_use[v]]

    def tensor_cuts(self, positions: Sequence[int]) -> list[int]:
        """The positions whose crossing values are all tensors."""
        return [c for c in positions if all(isinstance(v.meta.get("val"), torch.Tensor) for v in self.crossing(c))]


def _stack(node: torch.fx.Node) -> list[tuple[str, str]]:
    """(qualified name, type name) of each module the node ran in, outermost first,
    the root left out."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for path, kind in stack.values():
        if path:
            out.append((path, kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"))
    return out


def _blocks(compute: list[torch.fx.Node]) -> list[str | None]:
    """Each node's block (see the module docstring), or None."""
    stacks = [_stack(n) for n in compute]
    children: dict[str, dict[str, str]] = {"": {}}  # module -> {child: type}, as the stacks show them
    for stack in stacks:
        parent = ""
        for path, kind in stack:
            children.setdefault(parent, {})[path] = kind
            children.setdefault(path, {})
            parent = path

    def group(path: str) -> bool:
        kinds = [kind for child, kind in children[path].items() if children.get(child)]
        return any(kinds.count(k) >= 2 for k in set(kinds))

    out: list[str | None] = []
    for stack in stacks:
        out.append(next((path for path, _ in stack if not group(path)), None))
    return out


def _module_cuts(graph: _Graph, blocks: list[str | None]) -> list[int]:
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, b in enumerate(blocks):
        if b is not None:
            first.setdefault(b, i)
            last[b] = i
    starts = sorted(i for i in first.values() if i > 0)
    inside = [any(first[b] < i <= last[b] for b in first) for i in range(len(blocks) + 1)]
    return graph.tensor_cuts([i for i in starts if not inside[i]])


def _named_cuts(graph: _Graph, request: StageRequest, source: str) -> list[int]:
    cuts = []
    for name in request.at:
        at = next((i for i, n in enumerate(graph.compute) if any(path == name for path, _ in _stack(n))), None)
        if at is None:
            known = list(dict.fromkeys(p for n in graph.compute for p, _ in _stack(n)[:1]))
            raise UsageError(f"--stages at:{name}: {source} has no submodule {name!r} that runs in its exported graph",
                             hint=f"its top-level modules: {', '.join(known[:12])}{', ...' if len(known) > 12 else ''}")  # fmt: skip
        if at == 0:
            raise UsageError(f"--stages at:{name}: {name} is where the model starts; a cut there leaves stage 0 empty")
        if cuts and at <= cuts[-1]:
            raise UsageError(f"--stages at:{','.join(request.at)}: name the submodules in the order they run "
                             f"({name} runs before or with the one named before it)")  # fmt: skip
        if not graph.tensor_cuts([at]):
            kinds = sorted({type(v.meta.get("val")).__name__ for v in graph.crossing(at)} - {"FakeTensor", "Tensor"})
            raise UsageError(f"--stages at:{name}: the cut before {name} would pass a {' and a '.join(kinds)} between stages; "
                             "only tensors can cross", hint="cut before another submodule")  # fmt: skip
        cuts.append(at)
    return cuts


def balanced_cuts(candidates: list[int], flops: list[int], count: int) -> list[int]:
    """`count - 1` of the candidate positions that make the heaviest stage as light as
    possible (dynamic programming over the candidates)."""
    prefix = [0]
    for f in flops:
        prefix.append(prefix[-1] + max(f, 1))  # a node costs something, or a graph of free ops never balances
    if len(candidates) > _MAX_CANDIDATES:
        total = prefix[-1]
        wanted = [total * (k + 1) / (_MAX_CANDIDATES + 1) for k in range(_MAX_CANDIDATES)]
        candidates = sorted({min(candidates, key=lambda c: abs(prefix[c] - w)) for w in wanted})
    points = [0, *candidates, len(flops)]
    m = len(points)
    # best[k][j]: the lightest heaviest stage of k stages covering nodes [0, points[j]).
    best = [[math.inf] * m for _ in range(count + 1)]
    back = [[0] * m for _ in range(count + 1)]
    for j in range(1, m):
        best[1][j] = prefix[points[j]]
    for k in range(2, count + 1):
        for j in range(k, m):
            for i in range(k - 1, j):
                cost = max(best[k - 1][i], prefix[points[j]] - prefix[points[i]])
                if cost < best[k][j]:
                    best[k][j], back[k][j] = cost, i
    cuts, j = [], m - 1
    for k in range(count, 1, -1):
        j = back[k][j]
        cuts.append(points[j])
    return sorted(cuts)


# --- FLOPs -------------------------------------------------------------------------------


def _size(d: Any) -> int:
    """A dimension's size; a symbolic one at the size it was traced with."""
    if isinstance(d, int):
        return d
    hint = getattr(getattr(d, "node", None), "hint", None)
    return int(hint) if hint is not None else 1


def _numel(t: Any) -> int:
    return math.prod(_size(d) for d in t.shape) if isinstance(t, torch.Tensor) else 0


def node_flops(node: torch.fx.Node) -> int:
    """The estimated floating-point operations of one exported node (see the module
    docstring)."""
    from torch.utils.flop_counter import flop_registry

    out = node.meta.get("val")
    outs = [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
    elements = sum(_numel(x) for x in outs)
    op = node.target
    if node.op != "call_function" or not isinstance(op, torch._ops.OpOverload):
        return elements
    args, kwargs = pytree.tree_map_only(torch.fx.Node, lambda n: n.meta.get("val"), (node.args, node.kwargs))
    packet = op.overloadpacket
    aten = torch.ops.aten
    try:
        if packet in flop_registry:
            return int(flop_registry[packet](*args, **kwargs, out_val=out))
        if packet in (aten.linear, aten.matmul):
            return 2 * elements * _size(args[0].shape[-1]) + (elements if packet is aten.linear and len(args) > 2 else 0)
        if packet in (aten.conv1d, aten.conv2d, aten.conv3d):
            return 2 * elements * math.prod(_size(d) for d in args[1].shape[1:])
        if packet in (aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d):
            return 2 * _numel(args[0]) * math.prod(_size(d) for d in args[1].shape[1:])
        if packet is aten.scaled_dot_product_attention:
            q, k, v = args[:3]
            rows = math.prod(_size(d) for d in q.shape[:-1])
            return 2 * rows * _size(k.shape[-2]) * (_size(q.shape[-1]) + _size(v.shape[-1]))
    except (TypeError, IndexError, AttributeError, RuntimeError):
        pass  # shapes the formula does not take: count the output as for any op
    return elements


# --- the stages as modules -----------------------------------------------------------


def _parts(gm: torch.fx.GraphModule, graph: _Graph, blocks: list[str | None], cuts: list[int],
           example_args: tuple[torch.Tensor, ...]) -> list[StagePart]:  # fmt: skip
    bounds = [0, *cuts, len(graph.compute)]
    flops = [node_flops(n) for n in graph.compute]
    parts: list[StagePart] = []
    args = tuple(example_args)
    inputs: list[torch.fx.Node] = list(graph.placeholders)
    for k in range(len(bounds) - 1):
        lo, hi = bounds[k], bounds[k + 1]
        last = k == len(bounds) - 2
        outputs = graph.outputs if last else graph.crossing(hi)
        module, attrs = _stage_module(gm, graph.compute[lo:hi], inputs, outputs, k)
        with torch.no_grad():
            produced = tuple(module(*args))
        named = [b for b in blocks[lo:hi] if b is not None]
        weights = sum(t.numel() * t.element_size() for t in attrs.values() if isinstance(t, torch.Tensor))
        parts.append(StagePart(k, module, args, _dynamic_shapes(inputs), tuple(v.name for v in inputs),
                               tuple(v.name for v in outputs), named[0] if named else None, named[-1] if named else None,
                               sum(flops[lo:hi]), weights))  # fmt: skip
        if not all(isinstance(x, torch.Tensor) for x in produced):
            raise LoweringError(f"stage {k} returns a value that is not a tensor; only tensors can cross stages")
        args, inputs = produced, list(outputs)
    return parts


def _stage_module(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node], inputs: list[torch.fx.Node],
                  outputs: list[torch.fx.Node], index: int) -> tuple[torch.fx.GraphModule, dict[str, Any]]:  # fmt: skip
    """A module computing `outputs` from `inputs` with `nodes`, holding the parameters
    and buffers they read under their own names; and those tensors by name."""
    g = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    attrs: dict[str, Any] = {}
    for v in inputs:
        env[v] = g.placeholder(v.name)
        env[v].meta = dict(v.meta)

    def value(n: torch.fx.Node) -> torch.fx.Node:
        if n not in env:
            if n.op != "get_attr":
                raise LoweringError(f"stage {index} reads {n.name}, made outside it")  # a bug in the cut, not the model
            env[n] = g.get_attr(n.target)
            env[n].meta = dict(n.meta)
            attrs[n.target] = _attr(gm, n.target)
        return env[n]

    for n in nodes:
        env[n] = g.node_copy(n, value)
    g.output(tuple(value(v) for v in outputs))
    module = torch.fx.GraphModule(gm, g, class_name=f"Stage{index}")  # copies exactly the attributes `g` reads
    return module, attrs


def _attr(module: torch.nn.Module, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _dynamic_shapes(inputs: list[torch.fx.Node]) -> tuple[dict[int, Any], ...] | None:
    """torch.export's dynamic dimensions of a stage: those that are symbolic where its
    inputs were made in the whole program."""
    dims = tuple({j: torch.export.Dim.DYNAMIC for j, d in enumerate(getattr(v.meta.get("val"), "shape", ()))
                  if not isinstance(d, int)} for v in inputs)  # fmt: skip
    return dims if any(dims) else None
