"""AOTInductor: the exported program compiled ahead of time by PyTorch's Inductor into
a shared library, packaged with its weights (`torch._inductor.aoti_compile_and_package`,
weights frozen into the code), loaded with `torch._inductor.aoti_load_package`.

It needs torch and a C++ compiler to build, and torch to run. Its code is built for
the compile host (`-march=native`) against that torch build's headers and libraries,
so the artifact records both, the CPU features as IREE's `cpu:host` does and the exact
torch version, and the loader offers it only to a host with the same. Only the CPU is
built here (a CUDA build needs the GPU's toolchain at compile time).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from hxc.engines.base import Built, BuildJob, Engine, Session, bundle_name, file_bytes, StatelessSession
from hxc.errors import first_line
from hxc.manifests.schema import Artifact, Requirements, Signature
from hxc.targets import Device

OPTIONS = ("freezing=True",)  # weights are constants of the compiled code: what torch.compile does at its best


class InductorEngine(Engine):
    name = "inductor"
    summary = "AOTInductor: PyTorch's own compiler, ahead of time, as a shared library for this CPU and torch build"
    families = ("cpu",)
    precisions = ("fp32", "fp16", "bf16")
    build_needs = ("torch",)
    run_needs = ("torch",)
    install_hint = "pip install torch (the version the artifact was built with)"
    static_rank_offset = -13

    def missing_for_build(self) -> str | None:
        import shutil

        if (why := super().missing_for_build()) is not None:
            return why
        if not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++")):
            return "no C++ compiler (g++ or clang++) on PATH: apt-get install g++"
        return None

    def build(self, job: BuildJob) -> Built:
        import torch

        from hxc.targets.cpu import FAMILY as CPU

        t0 = time.perf_counter()
        [host] = [v for v in CPU.variants if v.name == "host"]
        cpu = CPU.plan(host).requires  # -march=native: the compile host's instruction set
        requires = Requirements(isa=cpu.isa, cpu_features=cpu.cpu_features, packages=(f"torch=={torch.__version__}",))
        common = dict(engine=self.name, family=job.family, precision=job.precision, backend="cpp", driver="torch",
                      binary=f"aoti-{cpu.isa}", options=OPTIONS, requires=requires)  # fmt: skip
        try:
            out = _compile(job)
        except Exception as e:
            return Built(status="failed", seconds=time.perf_counter() - t0, error=f"AOTInductor failed: {first_line(e)}", **common)
        return Built(status="ok", seconds=time.perf_counter() - t0, file=out,
                     bundle_name=bundle_name(f"{job.family}-inductor", job.precision, ".pt2"), **common)  # fmt: skip

    def uses_shared_weights(self, artifact: Artifact) -> bool:
        return False  # frozen into the package

    def open(self, artifact: Artifact, file: Any, device: Device, weights: tuple[Any, str] | None) -> Session:
        return InductorSession.open(file_bytes(file))


class InductorSession(StatelessSession):
    engine_name = "AOTInductor"

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.device_seconds = 0.0

    @classmethod
    def open(cls, package: bytes) -> InductorSession:
        import torch

        # The loader hands over the bytes it checked; the package loader wants a path,
        # so they go to a private file that lives only until the library is loaded.
        with tempfile.TemporaryDirectory(prefix="hxc-aoti-") as d:
            path = os.path.join(d, "model.pt2")
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(package)
            return cls(torch._inductor.aoti_load_package(path))

    def _tensors(self, arrays: list[np.ndarray], signature: Signature) -> list[Any]:
        from hxc.dtypes import to_torch

        return [to_torch(a, s.dtype) for a, s in zip(arrays, signature.inputs)]

    def invoke(self, arrays: list[np.ndarray], signature: Signature) -> list[np.ndarray]:
        import torch
        import torch.utils._pytree as pytree

        from hxc.dtypes import to_numpy

        tensors = self._tensors(arrays, signature)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.runner(*tensors)
        self.device_seconds = time.perf_counter() - t0
        return [to_numpy(t) for t in pytree.tree_leaves(out)]

    def prepare(self, arrays: list[np.ndarray], signature: Signature) -> Callable[[], None]:
        import torch

        tensors, runner = self._tensors(arrays, signature), self.runner

        def call() -> None:
            with torch.inference_mode():
                runner(*tensors)

        return call


def _compile(job: BuildJob) -> Any:
    import torch

    from hxc.compiler.torch_program import program_at_precision, program_with_weights
    from hxc.golden import golden_arrays

    assert job.program is not None
    program = program_with_weights(job.program, str(job.program), job.weights)
    inputs, _ = golden_arrays(job.golden, job.signature)
    from hxc.dtypes import to_torch

    args = tuple(to_torch(a, s.dtype) for a, s in zip(inputs, job.signature.inputs))
    program = program_at_precision(program, args, job.precision)
    out = job.workdir / f"inductor-{job.family}-{job.precision}.pt2"
    configs = {k: v == "True" for k, v in (o.split("=") for o in OPTIONS)}
    with torch.no_grad():
        torch._inductor.aoti_compile_and_package(program, package_path=str(out), inductor_configs=configs)
    return out


ENGINE = InductorEngine()
