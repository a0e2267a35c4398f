"""Any Vulkan device through IREE's SPIR-V backend, run by the vulkan driver.

Two default variants, because Vulkan devices differ most in the integer and float
widths their shaders may use:
- `spirv`, portable: IREE's baseline profile (vp_android_baseline_2022: 32-bit
  integers and floats only), which any conformant device runs, plus 8-bit storage for
  booleans (see _PORTABLE_TARGET): only a model that stores them needs it. 64-bit
  integers are computed in 32 bits (`--iree-input-demote-i64-to-i32`) and f16/bf16 in f32. Where
  the model's interface has those types, the artifact takes and returns the 32-bit
  ones and the loader converts at the boundary, refusing integer inputs that do not
  fit in 32 bits, so callers still see the model's own signature.
- `desktop`: what current desktop drivers (NVIDIA, AMD, Intel, Mesa's lavapipe) offer:
  64/16/8-bit integers, f16 and 8/16-bit storage, within the workgroup limits every
  Vulkan device meets. IREE has no such target by name, so the variant passes a full
  target description to `--iree-hal-target-device`. It uses no subgroup operations:
  IREE's vendor profiles that have 64-bit integers also assume a subgroup size (32 for
  NVIDIA's), and code built that way returned wrong numbers on lavapipe (subgroup size
  8; BERT max abs error 3.5). bf16 is computed in f32 (IREE's SPIR-V path has no bf16).
The vendor-tuned variants use one vendor's subgroup sizes and cooperative-matrix
extensions and are picked only on that vendor's devices. Every variant's compile also
reorders the loops of depthwise convolutions first (spirv_depthwise.mlir): IREE 3.13's
SPIR-V code for them is wrong otherwise.

Each artifact records the Vulkan features its SPIR-V needs, read from the
capabilities the compiled shaders declare, and the loader checks them against the
device: IREE's device info gives shaderFloat16, shaderInt8, the storage features and
the subgroup operations; shaderInt64/Int16/Float64 come from the Vulkan API itself
(`_vulkan_api`). A feature neither source reports is not held against the device:
loading is the test then, and a load failure moves on to the next artifact.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

from hxc.manifests.schema import Artifact, Requirements
from hxc.targets.base import Amendment, CheckFailed, CompilePlan, Device, TargetFamily, Variant, device_uri

# Vulkan vendor IDs, as the driver reports them.
VENDORS = {0x10DE: "nvidia", 0x1002: "amd", 0x8086: "intel", 0x13B5: "arm", 0x5143: "qualcomm", 0x10005: "mesa"}

# SPIR-V capability (its enum value) -> the Vulkan device feature that allows it.
# Capabilities every Vulkan device has (Shader, Matrix) are not listed.
CAPABILITY_FEATURES = {
    9: "shaderFloat16",
    10: "shaderFloat64",
    11: "shaderInt64",
    12: "shaderBufferInt64Atomics",
    22: "shaderInt16",
    39: "shaderInt8",
    61: "subgroup:basic",
    62: "subgroup:vote",
    63: "subgroup:arithmetic",
    64: "subgroup:ballot",
    65: "subgroup:shuffle",
    66: "subgroup:shuffle_relative",
    4433: "storageBuffer16BitAccess",
    4434: "uniformAndStorageBuffer16BitAccess",
    4435: "storagePushConstant16",
    4441: "variablePointersStorageBuffer",
    4442: "variablePointers",
    4448: "storageBuffer8BitAccess",
    4449: "uniformAndStorageBuffer8BitAccess",
    4450: "storagePushConstant8",
    5347: "bufferDeviceAddress",
    6016: "shaderIntegerDotProduct",
    6017: "shaderIntegerDotProduct",
    6018: "shaderIntegerDotProduct",
    6019: "shaderIntegerDotProduct",
    6022: "cooperativeMatrix",
}
# VkSubgroupFeatureFlagBits, as IREE's device info prints the mask.
_SUBGROUP_OPS = {"basic": 0x1, "vote": 0x2, "arithmetic": 0x4, "ballot": 0x8, "shuffle": 0x10, "shuffle_relative": 0x20}
# Features the loader can learn from the Vulkan API when IREE does not say.
_CORE = ("shaderFloat64", "shaderInt64", "shaderInt16")

_BASE = ("--iree-hal-target-device=vulkan",)


def _gpu_target(arch: str, compute: str, storage: str) -> str:
    """An IREE Vulkan target with these compute and storage widths, no subgroup
    operations, and the Vulkan spec's minimum workgroup limits (those of IREE's
    baseline profile, vp_android_baseline_2022)."""
    return (
        '--iree-hal-target-device=#hal.device.target<"vulkan", [#hal.executable.target<"vulkan-spirv", "vulkan-spirv-fb", '
        f'{{iree_codegen.target_info = #iree_gpu.target<arch = "{arch}", features = "spirv:v1.3,cap:Shader", '
        f"wgp = <compute = {compute}, storage = {storage}, subgroup = none, "
        "subgroup_size_choices = [64], max_workgroup_sizes = [128, 128, 64], max_thread_count_per_workgroup = 128, "
        "max_workgroup_memory_bytes = 16384, max_workgroup_counts = [65535, 65535, 65535]>>}>]> : !hal.device"
    )


# The desktop profile: the integer and float widths desktop drivers support.
_DESKTOP_TARGET = _gpu_target("", "fp32|fp16|int64|int32|int16|int8", "b64|b32|b16|b8")
# The portable profile: IREE's baseline (32-bit compute and storage) plus 8-bit integers
# and 8-bit storage buffers, which hold booleans (IREE stores i1 tensors as i8). With
# 32-bit storage only, IREE 3.13 emulates i8 buffers in i32 words and gets it wrong in two
# ways seen on lavapipe: a vectorized read of a padding mask loaded 4 i32 words for 4
# bytes (nn.MultiheadAttention with key_padding_mask, max abs error 0.26), and a
# boolean row reduction (torch's _safe_softmax in SDPA) left the last 16 of 400 bytes
# unwritten (Whisper's encoder, 0.062). SPIR-V declares Int8/StorageBuffer8BitAccess only
# where the model has such tensors, and the artifact then requires those features.
_PORTABLE_TARGET = _gpu_target("vp_android_baseline_2022", "fp32|int32|int8", "b32|b8")
_PROMOTE_BF16 = ("--iree-input-promote-bf16-to-f32",)
_PORTABLE = (_PORTABLE_TARGET, "--iree-input-demote-i64-to-i32", "--iree-input-promote-f16-to-f32", *_PROMOTE_BF16)
# A transform applied to every SPIR-V compile: it reorders the loops of depthwise
# convolutions, whose code IREE 3.13 otherwise gets wrong (see the file). A path inside
# the installed package, so it goes in at plan time, not in the variants' flags.
DEPTHWISE_SPEC = Path(__file__).with_name("spirv_depthwise.mlir")
# Names the check of IREE's invocation mapping (hxc.targets._spirv_dispatch) in the
# compile cache key and the artifact's `verified` note: SPIR-V compiled before it was
# checked is compiled again.
DISPATCH_CHECK = "hxc dispatch-mapping check 1"
_PORTABLE_CASTS = (("i64", "i32"), ("f16", "f32"), ("bf16", "f32"), ("f64", "f32"))
_DESKTOP_CASTS = (("bf16", "f32"), ("f64", "f32"))


def _spirv(name: str, summary: str, default: bool, flags: tuple[str, ...], vendor: str | None,
           casts: tuple[tuple[str, str], ...], aliases: tuple[str, ...] = ()) -> Variant:  # fmt: skip
    device = () if any(f.startswith("--iree-hal-target-device=") for f in flags) else _BASE
    return Variant("vulkan", name, summary, default, (*device, *flags), Requirements(vendor=vendor), "spirv",
                   aliases, casts)  # fmt: skip


class VulkanFamily(TargetFamily):
    name = "vulkan"
    summary = "Any Vulkan GPU (or Mesa lavapipe), through IREE's SPIR-V backend"
    backend = "vulkan-spirv"
    drivers = ("vulkan",)
    # Reduced precision is not offered: bf16 fails to compile for SPIR-V (`vector.bitcast`
    # of bf16), and fp16 code for the portable profile compiled but returned wrong
    # numbers on lavapipe (max abs error 0.46 against PyTorch on the example CNN). A
    # language model's int8 / int4 weights (float32 compute) compile for every variant
    # and give the recorded numbers on lavapipe (8-bit storage, which the portable
    # profile declares).
    precisions = ("fp32", "int8", "int4")
    # A call where a dynamic dimension is 0 fails in IREE 3.13's Vulkan driver: "Vulkan
    # dispatch binding 0 resolved to an empty buffer range" (command_buffer.c, when the
    # command buffer is recorded: a descriptor's range may not be 0 in Vulkan), measured
    # on lavapipe with a MatMul + ReduceSum model and 0 rows; the device stays usable.
    # Statically 0 dimensions are folded away by the compiler and run. The loader answers
    # such calls itself where the outputs' shapes alone say they are empty (see
    # hxc.engines.iree.IreeSession.invoke).
    empty_dispatch = False
    variants = (
        _spirv("spirv", "portable SPIR-V for any Vulkan device: 32-bit types only (i64 computed in i32, f16/bf16 in f32)",
               True, _PORTABLE, None, _PORTABLE_CASTS, ("portable",)),
        _spirv("desktop", "SPIR-V for desktop-class Vulkan (NVIDIA, AMD, Intel, lavapipe): i64, f16, 8/16-bit types",
               True, (_DESKTOP_TARGET, *_PROMOTE_BF16), None, _DESKTOP_CASTS),
        _spirv("rdna3", "SPIR-V tuned for AMD RDNA3", False, ("--iree-vulkan-target=rdna3", *_PROMOTE_BF16), "amd",
               _DESKTOP_CASTS),
        _spirv("ampere", "SPIR-V tuned for NVIDIA Ampere", False, ("--iree-vulkan-target=ampere", *_PROMOTE_BF16),
               "nvidia", _DESKTOP_CASTS),
        _spirv("ada", "SPIR-V tuned for NVIDIA Ada", False, ("--iree-vulkan-target=ada", *_PROMOTE_BF16), "nvidia",
               _DESKTOP_CASTS),
    )  # fmt: skip

    def plan(self, variant: Variant) -> CompilePlan:
        # The shaders are kept so their capabilities become the artifact's requirements,
        # and the configured dispatches so the ones IREE would distribute wrongly are
        # found and serialised (`amend_configurations`); the check is in the cache key.
        flags = (*variant.flags, f"--iree-preprocessing-transform-spec-filename={DEPTHWISE_SPEC}")
        return CompilePlan(variant, flags, variant.binary, variant.requires, dump_binaries=True,
                           checked_by=DISPATCH_CHECK, dump_configurations=True)  # fmt: skip

    def amend_configurations(self, plan: CompilePlan, configs: Path) -> Amendment | None:
        from hxc.targets._spirv_dispatch import DispatchCheckError, find_all, serialise

        try:
            total, found = find_all(configs)
        except DispatchCheckError as e:
            raise CheckFailed(f"cannot check how IREE distributes the SPIR-V dispatches: {e}") from None
        if not found:
            return Amendment(f"{DISPATCH_CHECK}: none of {total} dispatches shares memory across invocations")

        def rewrite(module: str) -> str:
            try:
                return serialise(module, found)
            except DispatchCheckError as e:
                raise CheckFailed(f"cannot serialise the SPIR-V dispatches IREE would distribute wrongly: {e}") from None

        first = found[0]
        return Amendment(f"{DISPATCH_CHECK}: {len(found)} of {total} dispatches run one invocation per workgroup, "
                         f"their ops' loops disagree ({first.executable}: {first.reason})", rewrite)  # fmt: skip

    def binary_requirements(self, plan: CompilePlan, binaries: Path | None) -> Requirements | None:
        if binaries is None:
            return None
        features: set[str] = set()
        for spv in sorted(binaries.rglob("*.spv")):
            features |= {CAPABILITY_FEATURES[c] for c in spirv_capabilities(spv.read_bytes()) if c in CAPABILITY_FEATURES}
        return Requirements(vendor=plan.requires.vendor, vulkan_features=tuple(sorted(features)))

    def describe_devices(self, driver: str, devices: list[dict], dump_info) -> list[Device]:
        out = []
        for d in devices:
            info = dump_info(d["device_id"])
            fields = dict(re.findall(r"^(\w+):\s*(.*)$", info, flags=re.MULTILINE))
            vendor_id = int(fields.get("vendor_id", "0"), 16) if fields.get("vendor_id", "").startswith("0x") else 0
            out.append(Device(
                driver, device_uri(driver, d), fields.get("name") or d.get("name") or "Vulkan device",
                fields.get("type", "other"), arch=fields.get("driver"), vendor=VENDORS.get(vendor_id, hex(vendor_id)),
                driver_version=" ".join(x for x in (fields.get("driver_info"), fields.get("api")) if x) or None,
                features=device_features(info),
            ))  # fmt: skip
        return out

    def cannot_run(self, artifact: Artifact, device: Device) -> str | None:
        if reason := self.wrong_driver(device):
            return reason
        want = artifact.requires.vendor
        if want and device.vendor != want:
            return f"SPIR-V tuned for {want} GPUs; this device is {device.vendor}"
        missing = missing_features(artifact.requires.vulkan_features, device)
        if missing:
            return f"needs Vulkan features this device lacks: {', '.join(missing)}"
        return None

    def rank(self, artifact: Artifact, device: Device) -> int:
        # Without measurements, a real GPU beats CPU code, and CPU code beats a software
        # Vulkan device (lavapipe reports type `cpu` and is ~35x slower than llvm-cpu).
        # Among Vulkan variants that fit: vendor-tuned, then the one using the most of
        # the device (native 64-bit integers, f16), then the portable one.
        base = {"discrete-gpu": 80, "integrated-gpu": 45, "virtual-gpu": 40}.get(device.kind, 10)
        return base + (5 if artifact.requires.vendor else 0) + (0 if artifact.interface_casts else 2)


def spirv_capabilities(binary: bytes) -> set[int]:
    """The OpCapability operands of a SPIR-V module (empty if it is not one)."""
    if len(binary) < 20 or len(binary) % 4:
        return set()
    magic = struct.unpack_from("<I", binary)[0]
    order = "<" if magic == 0x07230203 else ">" if magic == 0x03022307 else None
    if order is None:
        return set()
    words = struct.unpack(f"{order}{len(binary) // 4}I", binary)
    caps, i = set(), 5
    while i < len(words):
        count, opcode = words[i] >> 16, words[i] & 0xFFFF
        if opcode == 17 and count >= 2:  # OpCapability
            caps.add(words[i + 1])
        elif opcode not in (17, 10, 11, 14, 15, 16):  # capabilities come first; stop at the first other section
            break
        i += max(count, 1)
    return caps


def device_features(info: str) -> tuple[str, ...]:
    """Features from IREE's device info text: its `features:` line and the subgroup
    operations mask, as `name` when supported and `no:name` when not (features it does
    not mention stay unknown)."""
    found: list[str] = []
    if m := re.search(r"^features:(.*)$", info, flags=re.MULTILINE):
        found += [k if v == "yes" else f"no:{k}" for k, v in re.findall(r"(\w+)=(\w+)", m.group(1))]
    if m := re.search(r"^subgroup:.*operations=(0x[0-9a-fA-F]+)", info, flags=re.MULTILINE):
        mask = int(m.group(1), 16)
        found += [("" if mask & bit else "no:") + f"subgroup:{name}" for name, bit in _SUBGROUP_OPS.items()]
    return tuple(found)


def missing_features(needed: tuple[str, ...], device: Device) -> list[str]:
    """The needed features the device is known to lack. A feature nobody reports for
    this device counts as present: loading the artifact is then the test."""
    lacks = {f[3:] for f in device.features if f.startswith("no:")}
    if any(f in _CORE and f not in device.features and f not in lacks for f in needed):
        core = core_features(device)
        if core is not None:
            lacks |= set(_CORE) - set(core)
    return [f for f in needed if f in lacks]


def core_features(device: Device) -> tuple[str, ...] | None:
    """shaderInt64/Int16/Float64 of this device from the Vulkan API, or None if unknown.
    Asked only when an artifact needs one of them: it costs a Vulkan instance."""
    from hxc.targets._vulkan_api import physical_devices

    found = physical_devices()
    if found is None:
        return None
    matches = [p for p in found if p.name == device.name]
    return matches[0].features if len(matches) == 1 or (matches and len({m.features for m in matches}) == 1) else None


FAMILY = VulkanFamily()
