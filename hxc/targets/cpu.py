"""CPU code through IREE's llvm-cpu backend, run by the local-task driver.

IREE puts no CPU-feature check in the artifact: x86-64-v4 code dies with SIGILL on a
CPU without AVX-512. So each variant records the /proc/cpuinfo flags it needs, and
`cannot_run` compares them with the host's before anything is loaded.

Default flags turn on what IREE leaves off, chosen by measurement on this project's
benchmark models (benchmarks/cpu_flags.py, README "Measurements"): data tiling (1.3x on
BERT-base, 2.9x on GPT-2 small) and im2col for convolutions (2.4x on ResNet-18).
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from hxc.manifests.schema import Artifact, Requirements
from hxc.targets.base import KEEP_F64, CompilePlan, Device, TargetFamily, Variant, device_uri

# NHWC convolutions: 1.05x on ResNet-18 at batch 1 and 1.4x at batch 8 here, but IREE
# 3.13 miscompiles some graphs with it ("operand #1 does not dominate this use" on the
# TorchScript-converted test CNN), so it is a tuning alternative, not a default.
CHANNELS_LAST = "--iree-preprocessing-pass-pipeline=builtin.module(util.func(iree-preprocessing-convert-conv-to-channels-last))"
# Chosen for speed, not needed for correctness: a compile that fails with them is
# retried without them (IREE 3.13's data tiling fails on some boolean code:
# "'linalg.pack' op expected padding_value has 'i8' but got: 'i1'").
DATA_TILING = "--iree-opt-data-tiling"
SPEED_FLAGS = (DATA_TILING, "--iree-global-opt-use-im2col-for-convs")
# IREE 3.13 has two data-tiling paths; DATA_TILING picks the one from dispatch creation,
# which fails on a matmul whose reduction is a dynamic dim of a transposed operand:
# a language model's attention over the filled span of its KV cache ("'affine.
# delinearize_index' op no basis element may be statically non-positive"). The path
# from global optimisation compiles it, so it is tried before data tiling is dropped:
# a 125M Llama at one thread then decodes 1.4x faster (40 -> 56 tokens/s) and its
# first token after 512 comes 1.25x sooner (README "Language models against llama.cpp").
GLOBAL_DATA_TILING = "--iree-global-opt-data-tiling"


def _global_data_tiling(flags: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(GLOBAL_DATA_TILING if f == DATA_TILING else f for f in flags)

COMMON_FLAGS = (
    "--iree-hal-target-device=local",
    "--iree-hal-local-target-device-backends=llvm-cpu",
    KEEP_F64,
    *SPEED_FLAGS,
)

# Weight-only int8 / int4 (hxc.compiler.quantize), measured on a stack of 2048x2048
# layers at batch 1, one thread: IREE 3.13 keeps every producer out of a CPU matmul's
# dispatch unless told otherwise, so the int8 -> f32 conversion ran as its own dispatch,
# writing the float weights each call (3.5-8x slower than fp32); with fusion allowed it
# runs inside the data-tiled matvec, reading int8 (2.4-2.8x faster than fp32). Without
# data tiling the fused matvec is a plain reduction (18 ms against 5 ms), and data
# tiling fails on a language model's prefill attention from hidden 768 ("exceeded stack
# allocation limit of 32768 bytes", 37 KB for Llama's 12 heads at context 256: the
# fallback then drops data tiling), so these artifacts allow 64 KiB of stack per
# dispatch (IREE's workers have 128 KiB). int4's nibbles are unpacked to int8 once, at
# load (a constant expression IREE hoists into an initializer when its growth is
# allowed): unpacking every call cost 40 ms against 4.5 ms for int8 weights.
_FUSE_DEQUANT = ("--iree-dispatch-creation-block-matmul-producer-fusion=false",
                 "--iree-llvmcpu-stack-allocation-limit=65536")  # fmt: skip
QUANTIZED_FLAGS = {"int8": _FUSE_DEQUANT,
                   "int4": (*_FUSE_DEQUANT, f"--iree-opt-const-expr-max-size-increase-threshold={1 << 40}")}  # fmt: skip

# x86-64 micro-architecture levels, as /proc/cpuinfo spells the flags.
X86_64_V3 = ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe")
X86_64_V4 = X86_64_V3 + ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")
SAPPHIRE_RAPIDS = X86_64_V4 + (
    "avx512_bf16",
    "avx512_fp16",
    "avx512_vnni",
    "avx512vbmi",
    "avx512_vbmi2",
    "avx512ifma",
    "avx512_bitalg",
    "avx512_vpopcntdq",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
# Flags that change which instructions LLVM may emit. `host` code needs all of those
# the compile host has; other cpuinfo flags (hypervisor, rdtscp...) do not matter.
X86_CODEGEN = SAPPHIRE_RAPIDS + (
    "sse3", "ssse3", "sse4_1", "sse4_2", "popcnt", "avx_vnni", "avx512_vp2intersect",
    "gfni", "vaes", "vpclmulqdq", "sha_ni", "adx", "clflushopt", "clwb", "xsave",
)  # fmt: skip
AARCH64_N1 = ("asimd", "asimddp", "atomics", "fphp", "asimdhp")
AARCH64_V1 = AARCH64_N1 + ("sve", "bf16", "i8mm")
AARCH64_CODEGEN = AARCH64_V1 + ("sve2", "sm4", "sha3", "asimdfhm", "svebf16", "svei8mm")


def _x86(cpu: str, features: tuple[str, ...]) -> tuple[tuple[str, ...], Requirements]:
    flags = (*COMMON_FLAGS, "--iree-llvmcpu-target-triple=x86_64-unknown-linux-gnu", f"--iree-llvmcpu-target-cpu={cpu}")
    return flags, Requirements(isa="x86_64", cpu_features=features)


def _arm(cpu: str, features: tuple[str, ...]) -> tuple[tuple[str, ...], Requirements]:
    flags = (*COMMON_FLAGS, "--iree-llvmcpu-target-triple=aarch64-unknown-linux-gnu", f"--iree-llvmcpu-target-cpu={cpu}")
    return flags, Requirements(isa="aarch64", cpu_features=features)


def _variant(name: str, summary: str, default: bool, spec, binary: str, aliases=()) -> Variant:
    flags, requires = spec
    return Variant("cpu", name, summary, default, flags, requires, binary, tuple(aliases))


@dataclass(frozen=True)
class HostCpu:
    isa: str  # x86_64 | aarch64 | ...
    model: str
    features: tuple[str, ...]
    cores: int


@functools.cache
def host_cpu() -> HostCpu:
    """This machine's CPU from /proc/cpuinfo (cheap; read once per process)."""
    isa = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    model, features = platform.processor() or isa, ()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and model in ("", isa):
            model = value.strip()
        elif key in ("flags", "features") and not features:
            features = tuple(sorted(value.split()))
    return HostCpu(isa=isa, model=model, features=features, cores=os.cpu_count() or 1)


class CpuFamily(TargetFamily):
    name = "cpu"
    summary = "CPUs, through IREE's llvm-cpu backend (x86-64 and aarch64)"
    backend = "llvm-cpu"
    drivers = ("local-task", "local-sync")
    variants = (
        _variant("host", "the CPU of the machine that compiles (fastest there, may not run elsewhere)",
                 True, (COMMON_FLAGS + ("--iree-llvmcpu-target-cpu=host",), Requirements()), "elf-host"),
        _variant("x86-64-v3", "x86-64 with AVX2/FMA: Intel Haswell+ (2013), AMD Zen 1+",
                 True, _x86("x86-64-v3", X86_64_V3), "elf-x86_64", ["avx2"]),
        _variant("x86-64-v4", "x86-64 with AVX-512: Intel Skylake-SP+, AMD Zen 4+",
                 True, _x86("x86-64-v4", X86_64_V4), "elf-x86_64", ["avx512"]),
        _variant("sapphirerapids", "Intel Sapphire Rapids+: AVX-512 BF16/FP16, AMX (fast bf16)",
                 False, _x86("sapphirerapids", SAPPHIRE_RAPIDS), "elf-x86_64", ["spr"]),
        _variant("aarch64", "64-bit Arm, Neoverse N1 baseline: Graviton2+, Ampere Altra, Apple M1+",
                 True, _arm("neoverse-n1", AARCH64_N1), "elf-arm_64", ["arm64", "neoverse-n1"]),
        _variant("aarch64-sve", "64-bit Arm with SVE and BF16: Neoverse V1+ (Graviton3+)",
                 False, _arm("neoverse-v1", AARCH64_V1), "elf-arm_64", ["neoverse-v1"]),
    )  # fmt: skip

    def plan(self, variant: Variant) -> CompilePlan:
        if variant.name != "host":
            return super().plan(variant)
        # `host` is resolved now, on the compile host, and the artifact records what that
        # CPU had: the loader will only pick it on a machine with the same features.
        cpu = host_cpu()
        wanted = X86_CODEGEN if cpu.isa == "x86_64" else AARCH64_CODEGEN
        requires = Requirements(isa=cpu.isa, cpu_features=tuple(f for f in wanted if f in cpu.features))
        binary = {"x86_64": "elf-x86_64", "aarch64": "elf-arm_64"}.get(cpu.isa, f"elf-{cpu.isa}")
        return CompilePlan(variant, variant.flags, binary, requires)

    def describe_devices(self, driver: str, devices: list[dict], dump_info) -> list[Device]:
        cpu = host_cpu()
        # One device for the whole CPU, however many the driver lists.
        return [Device(driver, device_uri(driver, d), cpu.model, "cpu", cpu.isa, cpu.features) for d in devices[:1]]

    def cannot_run(self, artifact: Artifact, device: Device) -> str | None:
        if reason := self.wrong_driver(device):
            return reason
        need = artifact.requires
        if need.isa and device.arch != need.isa:
            return f"{need.isa} code cannot run on this {device.arch} CPU"
        missing = [f for f in need.cpu_features if f not in device.features]
        if missing:
            return f"needs CPU features this CPU lacks: {', '.join(missing)}"
        return None

    def fallback_flags(self, plan: CompilePlan) -> list[tuple[str, ...]]:
        tries = []
        if DATA_TILING in plan.flags:
            tries.append(_global_data_tiling(plan.flags))
        safer = tuple(f for f in plan.flags if f not in SPEED_FLAGS)
        if safer != plan.flags:
            tries.append(safer)
        return tries

    def tuning_configs(self, plan: CompilePlan) -> list[tuple[str, tuple[str, ...]]]:
        # Each alternative drops or adds one thing the defaults decide, so the search
        # says which choice mattered for this model on this machine.
        flags = plan.flags
        without = lambda flag: tuple(f for f in flags if f != flag)  # noqa: E731
        return [
            ("default", flags),
            ("no-im2col", without("--iree-global-opt-use-im2col-for-convs")),
            ("no-data-tiling", without(DATA_TILING)),
            ("global-data-tiling", _global_data_tiling(flags)),
            ("channels-last", (*flags, CHANNELS_LAST)),
            ("ukernels-all", (*flags, "--iree-llvmcpu-enable-ukernels=all")),
        ]

    def precision_flags(self, precision: str) -> tuple[str, ...]:
        return QUANTIZED_FLAGS.get(precision, ())

    def rank(self, artifact: Artifact, device: Device) -> int:
        # Native code beats a software GPU. Among CPU variants that fit, the one that
        # may use the most instructions wins; the threaded driver beats local-sync.
        return 50 + min(len(artifact.requires.cpu_features), 40) // 4 + (1 if device.driver == "local-task" else 0)


FAMILY = CpuFamily()
