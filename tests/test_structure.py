"""The package's structure: imports go only down the pipeline's layers (`LAYERS`; imports
inside functions count), there are no import cycles, and the layers that must stay
light import nothing heavy: `hxc --help`, recognising a model
file, and compiling an ONNX model (no torch)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import hxc

PACKAGE = Path(hxc.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_graph() -> dict[str, set[str]]:
    """Every hxc module and the hxc modules it imports anywhere in its code, functions
    included; only `if TYPE_CHECKING:` blocks, which never run, are left out."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        skip: set[int] = set()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and _is_type_checking(node):
                skip |= {id(n) for child in node.body for n in ast.walk(child)}
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.split(".")[0] == "hxc"}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                if base.split(".")[0] != "hxc":
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    edges.add(sub if sub in modules else base)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# The pipeline's layers, top to bottom: a module imports only from its own row or rows
# below (imports inside functions count; `if TYPE_CHECKING:` blocks do not). Data flows
# one way: model -> IR -> artifacts -> bundle -> load -> run, pool, serve.
# `verify` and `reference` sit with the tools: checking a bundle runs each artifact in a
# throwaway worker (a crash in IREE must not take the check down) and rebuilds the
# reference from the bundle's program through its frontend.
LAYERS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (9, ("hxc.cli",)),
    (8, ("hxc.bench", "hxc.serve", "hxc.verify", "hxc.reference")),
    (7, ("hxc.build", "hxc.frontends")),
    (6, ("hxc.pool",)),
    (5, ("hxc.runtime",)),
    (4, ("hxc.engines",)),
    (3, ("hxc.compiler",)),
    (2, ("hxc.targets", "hxc.manifests")),
    (1, ("hxc", "hxc.errors", "hxc.registry", "hxc.ui", "hxc.dtypes", "hxc.arrays", "hxc.extras", "hxc.examples",
         "hxc.golden", "hxc.stats", "hxc.functions", "hxc.lm_calls")),
)


def layer(module: str) -> int | None:
    """The row of `module`: that of the longest package or module name it is or lies in
    (`hxc` itself is only the package's `__init__`)."""
    best: tuple[int, int] | None = None
    for row, names in LAYERS:
        for name in names:
            inside = module == name or (name != "hxc" and module.startswith(name + "."))
            if inside and (best is None or len(name) > best[1]):
                best = (row, len(name))
    return best[0] if best else None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import that climbs the table, and every module the table does not place."""
    found = [f"{m} is in no row of LAYERS" for m in sorted(graph) if layer(m) is None]
    for m in sorted(graph):
        for target in sorted(graph[m]):
            if (layer(m) or 0) < (layer(target) or 0):
                found.append(f"{m} (row {layer(m)}) imports {target} (row {layer(target)})")
    return found


def test_imports_only_go_down_the_layers():
    climbing = upward_imports(import_graph())
    assert climbing == [], "imports that climb the layers:\n" + "\n".join(climbing)


def test_the_layer_check_finds_a_climbing_import():
    graph = {"hxc.engines.iree": {"hxc.runtime.loader"}, "hxc.runtime.loader": {"hxc.engines.base"},
             "hxc.engines.base": set(), "hxc.nowhere": set()}  # fmt: skip
    assert upward_imports(graph) == ["hxc.nowhere is in no row of LAYERS",
                                     "hxc.engines.iree (row 4) imports hxc.runtime.loader (row 5)"]  # fmt: skip


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert "hxc.compiler.torch_import" in graph["hxc.frontends.base"]  # imported inside a function
    assert "hxc.compiler.torch_export" not in graph["hxc.frontends.base"]  # only under TYPE_CHECKING
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_inside_hxc():
    cycles = _cycles(import_graph())
    assert cycles == [], "import cycles (counting imports inside functions): " + "; ".join(" <-> ".join(c) for c in cycles)


def _imported_after(code: str, *args: str) -> list[str]:
    heavy = ("torch", "onnx", "onnxruntime", "iree.runtime", "iree.compiler", "iree.turbine")
    probe = f"{code}\nimport sys, json; print(json.dumps([m for m in {heavy!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_help_imports_neither_torch_nor_iree():
    assert _imported_after("from hxc.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass") == []
    assert _imported_after("from hxc.cli import main\ntry:\n    main(['compile', '--help'])\nexcept SystemExit:\n    pass") == []


@pytest.mark.parametrize("key", ["pt2", "torchscript", "pickle", "garbage"])
def test_recognising_a_model_file_imports_nothing_heavy(key, models):
    code = "import sys\nfrom hxc import frontends\ntry:\n    frontends.recognise(sys.argv[1])\nexcept Exception:\n    pass"
    assert _imported_after(code, str(models[key])) == []


def test_compiling_an_onnx_model_does_not_import_torch(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])  # fmt: skip
    model = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    code = (
        "import sys\nfrom hxc.build import build_bundle\n"
        "assert build_bundle(sys.argv[1], sys.argv[2], 'cpu:host', use_cache=False).written"
    )
    loaded = _imported_after(code, str(model), str(tmp_path / "relu.hxc"))
    assert "torch" not in loaded and "iree.turbine" not in loaded
    assert "onnx" in loaded  # the probe does see what the compile imported
