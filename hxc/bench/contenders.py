"""What `hxc bench` times: each artifact this host can run, and baselines rebuilt from
the bundle itself (PyTorch eager and torch.compile from the saved program, ONNX
Runtime from the saved ONNX model), so a bundle is all a benchmark needs."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hxc.bench.measure import Contender
from hxc.dtypes import to_torch
from hxc.errors import BundleError, UsageError
from hxc.manifests.schema import PROGRAM_ONNX, PROGRAM_PT2, Manifest
from hxc.runtime.probe import HostProbe
from hxc.runtime.select import select


def artifact_contenders(bundle: Path, manifest: Manifest, probe: HostProbe, device: str | None = None) -> list[Contender]:
    """One contender per artifact this host can run (reduced precision included)."""
    from hxc.runtime.loader import load

    out = []
    for cand in select(manifest, probe, device=device, tolerance=float("inf")).candidates:
        holder: dict[str, Any] = {}
        art = cand.artifact

        def open_(art=art, holder=holder) -> None:
            holder["model"] = load(bundle, device=art.id, strict=True, tolerance=float("inf"), probe=probe)

        def prepare(inputs: list, holder=holder) -> Callable[[], None]:
            return holder["model"].prepare(inputs)

        threads = os.cpu_count() if cand.device.kind == "cpu" and cand.device.driver != "local-sync" else None
        out.append(Contender(art.id, cand.device.label, open_, prepare, device_time_only=True, threads=threads))
    return out


def torch_contender(
    candidate: str, bundle: Path, manifest: Manifest, cpu_label: str, *, compiled: bool, allow_pickle: bool
) -> Contender:
    """PyTorch eager (or torch.compile) on the bundle's program, weights restored."""
    import torch

    holder: dict[str, Any] = {}

    def open_() -> None:
        module = load_torch_module(bundle, manifest, allow_pickle=allow_pickle)
        holder["fn"] = torch.compile(module) if compiled else module

    def prepare(inputs: list) -> Callable[[], None]:
        tensors = [to_torch(a, s.dtype) for a, s in zip(inputs, manifest.signature.inputs)]
        fn = holder["fn"]

        def call() -> None:
            with torch.inference_mode():
                fn(*tensors)

        return call

    return Contender(candidate, cpu_label, open_, prepare, device_time_only=True, threads=torch.get_num_threads())


def onnxruntime_contender(candidate: str, bundle: Path, manifest: Manifest, cpu_label: str) -> Contender:
    """ONNX Runtime's CPU provider on the bundle's ONNX model."""
    holder: dict[str, Any] = {}

    def open_() -> None:
        import onnxruntime as ort

        holder["session"] = ort.InferenceSession(str(bundle / PROGRAM_ONNX), providers=["CPUExecutionProvider"])

    def prepare(inputs: list) -> Callable[[], None]:
        session = holder["session"]
        feed = {i.name: a for i, a in zip(session.get_inputs(), inputs)}
        return lambda: session.run(None, feed)

    return Contender(candidate, cpu_label, open_, prepare, device_time_only=True, threads=os.cpu_count())


def load_torch_module(bundle: Path, manifest: Manifest, *, allow_pickle: bool = False) -> Any:
    """The bundle's exported program as a runnable module, its weights restored from
    the bundle's parameter archive when they were stored there. Both files are read
    from their checked bytes, and the program is loaded without running code from it
    (`allow_pickle` lifts that, for programs whose weights torch itself pickled)."""
    import warnings

    import iree.runtime as rt
    import torch

    from hxc.compiler.torch_export import load_program
    from hxc.manifests.bundle import open_checked

    if manifest.model.program_file != PROGRAM_PT2:
        raise UsageError("this bundle holds no PyTorch program")
    checked = open_checked(bundle, manifest, manifest.model.program_file)
    weights = manifest.weights_for("fp32")
    # With shared weights the saved program holds stride-0 placeholders: their logical
    # size is the model's, not a sign of a bomb.
    program = load_program(checked.bytes(), str(checked.path), allow_pickle=allow_pickle, check_expansion=weights is None)
    checked.close()
    if weights is not None:
        from iree.turbine.aot import ParameterArchive

        irpa = open_checked(bundle, manifest, weights.file)
        archive = ParameterArchive()
        archive.index.load_from_file_handle(rt.FileHandle.wrap_memory(irpa.buffer), "irpa")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "non-writable NumPy array": we copy right away
            stored = {name: entry.as_tensor().clone() for name, entry in archive.items()}
        for name, old in list(program.state_dict.items()):
            if name in stored:
                new = stored[name].reshape(old.shape)
                program.state_dict[name] = torch.nn.Parameter(new, requires_grad=False) if isinstance(old, torch.nn.Parameter) else new
    # Weights saved as stride-0 placeholders (their values live in an archive) must never
    # run as if they were the model's: that would time and compare garbage.
    placeholders = [n for n, t in program.state_dict.items() if t.numel() > 1 and not any(t.stride())]
    if placeholders:
        raise BundleError(f"{bundle}: the program's weights ({placeholders[0]}, ...) are not in the bundle",
                          hint="recompile it with this hxc")  # fmt: skip
    return program.module()
