"""Find, and make safe, the SPIR-V dispatches IREE 3.13 distributes wrongly.

IREE's SPIR-V `BaseDistribute` pipeline (the one IREE 3.13 picks for every reduction
of hxc's default Vulkan variants, which declare no subgroup operations, static or
dynamic, and for dynamic-shape dispatches) tiles a dispatch to workgroups, keeps the
intermediate tensors between its ops in workgroup memory, then tiles *each op on its
own loops* to invocations, with no barrier between the ops. That is right only when
every op indexes each intermediate with the same loops in the same positions, so
that the invocation writing an element is the one that later reads it. IREE 3.13's
dispatch formation fuses ops whose loops are any permutation of the root's (a
LayerNorm whose output is transposed: `nn.MultiheadAttention` with batch_first does
that to a pre-norm encoder's input; a reduction over a middle dimension, whose result
is broadcast back along it), and there one invocation reads what another writes: on
lavapipe (8-wide subgroups run in order) every row past the first 8 read a zero sum,
so a pre-norm `nn.TransformerEncoder` at batch 2 returned Inf from length 8 on. The
depthwise-convolution bug `spirv_depthwise.mlir` works around is the same race (the
conv's loops against its zero fill's).

The check reads the configured executables (`--iree-hal-dump-executable-configurations-to`)
with IREE's own MLIR parser: in a BaseDistribute dispatch, every value one linalg op
produces and another consumes must be indexed by the same loop positions in both
(the producer's result map and the consumer's operand map have equal results); a
value that reaches a linalg op through anything else (a reshape, a slice, an op with
no indexing maps) counts as misaligned. A misaligned dispatch is rewritten to run one
invocation per workgroup (`workgroup_size = [1, 1, 1]`) in the whole configured module
(`--compile-to=executable-configurations`), which IREE then compiles on
(`--compile-from=executable-configurations`): the same tiles and the same arithmetic,
done by a single invocation, so nothing is shared between invocations. The other
dispatches keep IREE's parallel code.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The pipeline whose per-op distribution needs aligned loops.
PIPELINE = "BaseDistribute"
_WORKGROUP_SIZE = re.compile(r"(spirv_pipeline<" + PIPELINE + r">\s+workgroup_size\s*=\s*)\[\s*\d+\s*,\s*\d+\s*,\s*\d+\s*\]")
_SERIAL = "[1, 1, 1]"
# Ops whose results pass through a dispatch without being computed by invocations.
_PASSIVE = ("tensor.empty", "arith.constant", "iree_tensor_ext.dispatch.tensor.load", "hal.interface.constant.load")


class DispatchCheckError(Exception):
    """A configured executable could not be read or rewritten as expected."""


@dataclass(frozen=True)
class Misaligned:
    """A dispatch whose ops would share workgroup memory across invocations."""

    executable: str  # its hal.executable symbol
    function: str
    reason: str  # e.g. "linalg.generic result (d0, d1) read as (d1, d0) by linalg.generic"


def find_misaligned(text: str) -> list[Misaligned]:
    """The BaseDistribute dispatches of configured executables (MLIR text: one dumped
    executable, or a whole configured module) whose ops index a shared intermediate
    differently."""
    from iree.compiler import ir

    with ir.Context():
        module = _parse(ir, text)
        found = []
        for executable in _ops(module.operation, "hal.executable"):
            for func in _ops(executable, "func.func"):
                info = func.attributes["translation_info"] if "translation_info" in func.attributes else None
                if info is None or f"<{PIPELINE}>" not in str(info):
                    continue
                if reason := _first_misalignment(func):
                    found.append(Misaligned(_symbol(executable), _symbol(func), reason))
        return found


def find_all(configs: Path) -> tuple[int, list[Misaligned]]:
    """Check every configured executable IREE dumped into `configs`
    (`--iree-hal-dump-executable-configurations-to`): how many there are, and the
    misaligned dispatches among them."""
    files = sorted(configs.glob("*.mlir"))
    return len(files), [m for path in files for m in find_misaligned(path.read_text())]


def serialise(module_text: str, dispatches: list[Misaligned]) -> str:
    """The whole configured module (MLIR text) with each of `dispatches` set to one
    invocation per workgroup. Text, not bytecode: the bytecode the Python bindings write
    loses the module's resource blobs (inlined weights)."""
    from iree.compiler import ir

    wanted = {(d.executable, d.function) for d in dispatches}
    with ir.Context():
        module = _parse(ir, module_text)
        done = set()
        for executable in _ops(module.operation, "hal.executable"):
            for func in _ops(executable, "func.func"):
                key = (_symbol(executable), _symbol(func))
                if key not in wanted:
                    continue
                info = str(func.attributes["translation_info"])
                serial, n = _WORKGROUP_SIZE.subn(lambda m: m.group(1) + _SERIAL, info, count=1)
                if not n:
                    raise DispatchCheckError(f"{key[0]}: no {PIPELINE} workgroup size in {info}")
                func.attributes["translation_info"] = ir.Attribute.parse(serial)
                done.add(key)
        if missing := wanted - done:
            raise DispatchCheckError(f"not in the configured module: {', '.join('/'.join(k) for k in sorted(missing))}")
        return str(module)


# --- reading the IR -----------------------------------------------------------------


def _parse(ir: Any, text: str) -> Any:
    try:
        return ir.Module.parse(text)
    except Exception as e:  # MLIRError: IREE's own output should always parse
        raise DispatchCheckError(f"cannot parse IREE's configured executables ({str(e).strip().splitlines()[0]})") from None


def _walk(op: Any) -> Iterator[Any]:
    for region in op.regions:
        for block in region.blocks:
            for child in block.operations:
                yield child.operation
                yield from _walk(child.operation)


def _ops(root: Any, name: str) -> Iterator[Any]:
    return (op for op in _walk(root) if op.name == name)


def _symbol(op: Any) -> str:
    return str(op.attributes["sym_name"]).strip('"')


def _indexing_maps(op: Any) -> list[Any] | None:
    """The op's indexing maps (one per operand, inputs then inits), or None if it has
    none (not a linalg structured op)."""
    from iree.compiler.dialects import linalg

    if not op.name.startswith("linalg."):
        return None
    try:
        return list(linalg.get_indexing_maps(op))
    except Exception:  # not a structured op (linalg.yield, linalg.index)
        return None


def _results(affine_map: Any) -> tuple[str, ...]:
    return tuple(str(e) for e in affine_map.value.results)


def _first_misalignment(func: Any) -> str | None:
    """Why some value is shared across invocations in this function, or None."""
    ops = [op for op in _walk(func) if _indexing_maps(op) is not None]
    producer: dict[Any, tuple[Any, int]] = {}  # value -> (linalg op, result number)
    for op in ops:
        for i, r in enumerate(op.results):
            producer[r] = (op, i)
    computed = set(producer)
    for consumer in ops:
        cmaps = _indexing_maps(consumer)
        for k, value in enumerate(consumer.operands):
            if value in producer:
                p, i = producer[value]
                pmaps = _indexing_maps(p)
                written = _results(pmaps[len(pmaps) - len(p.results) + i])
                read = _results(cmaps[k])
                if written != read:
                    return (f"{p.name} result ({', '.join(written)}) read as ({', '.join(read)}) by {consumer.name}")
            elif (source := _computed_source(value, computed)) is not None:
                return f"{source} result reaches {consumer.name} through another op"
    return None


def _computed_source(value: Any, computed: set) -> str | None:
    """If `value` was derived (through non-linalg ops) from a value a linalg op in this
    dispatch computed, that op's name; None if it comes from outside (loads, constants)."""
    stack = [value]
    for _ in range(10_000):  # bounded: dispatches hold tens of ops
        if not stack:
            return None
        v = stack.pop()
        if v in computed:
            return "a linalg op's"
        owner = v.owner
        if not hasattr(owner, "name") or owner.name in _PASSIVE:
            continue  # a block argument, a load, an empty tensor, a constant
        if owner.name.startswith("linalg.") or owner.name.startswith("iree_linalg_ext."):
            return owner.name  # a structured op whose maps we do not know
        stack.extend(owner.operands)
    return "an op chain too long to follow: some op's"
