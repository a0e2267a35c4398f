"""Moving tensors between host memory and an IREE device, on every driver.

iree.runtime's own paths (`asdevicearray`, `DeviceArray.to_host`) import host memory
into the device. Vulkan requires such memory to be aligned to
minImportedHostPointerAlignment (4096 on Mesa's lavapipe), which numpy arrays are
not, so they fail there with "host allocation import pointer does not satisfy ...".
hxc never imports host pointers: inputs are copied into device-owned buffers, and
outputs that the host cannot map are read back through a mappable staging buffer
with a queue copy, as a GPU application would.
"""

from __future__ import annotations

import numpy as np

import iree.runtime as rt
from hxc.manifests.schema import DTYPES

_ELEMENT_TYPES = {
    "f64": rt.HalElementType.FLOAT_64,
    "f32": rt.HalElementType.FLOAT_32,
    "f16": rt.HalElementType.FLOAT_16,
    "bf16": rt.HalElementType.BFLOAT_16,
    "i64": rt.HalElementType.SINT_64,
    "i32": rt.HalElementType.SINT_32,
    "i16": rt.HalElementType.SINT_16,
    "i8": rt.HalElementType.SINT_8,
    "u8": rt.HalElementType.UINT_8,
    "i1": rt.HalElementType.BOOL_8,
    "u16": rt.HalElementType.UINT_16,
    "u32": rt.HalElementType.UINT_32,
    "u64": rt.HalElementType.UINT_64,
    "f8e4m3fn": rt.HalElementType.FLOAT_8_E4M3_FN,
    "f8e4m3fnuz": rt.HalElementType.FLOAT_8_E4M3_FNUZ,
    "f8e5m2": rt.HalElementType.FLOAT_8_E5M2,
    "f8e5m2fnuz": rt.HalElementType.FLOAT_8_E5M2_FNUZ,
}


def numpy_dtype(name: str) -> np.dtype:
    """The host dtype for a signature dtype; bf16 and float8 are ml_dtypes' types (an IREE dependency)."""
    numpy_name = DTYPES[name]
    if hasattr(np, numpy_name):
        return np.dtype(numpy_name)
    import ml_dtypes

    return np.dtype(getattr(ml_dtypes, numpy_name))


def raw_bits(a: np.ndarray) -> np.ndarray:
    """`a` viewed as unsigned integers of its width when numpy itself cannot name its
    dtype (bf16, float8): what the buffer protocol and .npz files can carry."""
    return a.view(f"u{a.dtype.itemsize}") if a.dtype.kind == "V" else a  # ml_dtypes' types are kind V


def from_raw_bits(a: np.ndarray, dtype: str) -> np.ndarray:
    """Undo `raw_bits` for an array of signature dtype `dtype`."""
    want = numpy_dtype(dtype)
    return a.view(want) if a.dtype != want and a.dtype.itemsize == want.itemsize and a.dtype.kind == "u" else a


def dtype_name(dtype: np.dtype) -> str | None:
    for name in DTYPES:
        if numpy_dtype(name) == dtype:
            return name
    return None


def to_device(device: rt.HalDevice, array: np.ndarray, dtype: str) -> rt.HalBufferView:
    """Copy a host array into a new device-local buffer view."""
    # Not np.ascontiguousarray: it turns a scalar (0-d array) into shape (1,).
    array = raw_bits(np.asarray(array, order="C"))  # the buffer protocol does not carry ml_dtypes types
    return device.allocator.allocate_buffer_copy(
        memory_type=rt.MemoryType.DEVICE_LOCAL,
        allowed_usage=rt.BufferUsage.DEFAULT,
        device=device,
        buffer=array,
        element_type=_ELEMENT_TYPES[dtype],
    )


def to_host(device: rt.HalDevice, view: rt.HalBufferView, dtype: str) -> np.ndarray:
    """Copy a device buffer view into a new host array."""
    shape = tuple(view.shape)
    host_dtype = numpy_dtype(dtype)
    buffer = view.get_buffer()
    if int(buffer.allowed_usage()) & int(rt.BufferUsage.MAPPING_SCOPED):
        return _mapped_copy(buffer, shape, host_dtype)
    staging = device.allocator.allocate_buffer(
        memory_type=rt.MemoryType.HOST_LOCAL | rt.MemoryType.DEVICE_VISIBLE,
        allowed_usage=rt.BufferUsage.TRANSFER_TARGET | rt.BufferUsage.MAPPING_SCOPED,
        allocation_size=buffer.byte_length(),
    )
    semaphore = device.create_semaphore(0)
    done = rt.HalFence.create_at(semaphore, 1)
    device.queue_copy(buffer, staging, rt.HalFence(0), done)
    done.wait()
    return _mapped_copy(staging, shape, host_dtype)


def _mapped_copy(buffer: rt.HalBuffer, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    count = int(np.prod(shape, dtype=np.int64))
    if dtype.itemsize * count == 0:
        return np.empty(shape, dtype)
    raw = buffer.map().asarray((count * dtype.itemsize,), np.dtype(np.uint8))
    # Copy out of the mapping before it goes away; view as the real dtype afterwards.
    return raw[: count * dtype.itemsize].copy().view(dtype).reshape(shape)


def read_arrays(files: list[str] | tuple[str, ...]) -> list[np.ndarray]:
    """Input arrays from .npy files (one per input) or a single .npz (all of them, in
    the order they were saved)."""
    from pathlib import Path

    from hxc.errors import UsageError, first_line

    arrays: list[np.ndarray] = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise UsageError(f"{name}: no such input file")
        try:
            loaded = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UsageError(f"{name}: not a .npy or .npz array file ({first_line(e)})") from None
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                arrays.extend(loaded[k] for k in loaded.files)
        else:
            arrays.append(loaded)
    return arrays


def is_torch(x: object) -> bool:
    """A torch tensor, recognised without importing torch."""
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def to_numpy(x: object) -> np.ndarray:
    """A host array for a numpy array, a torch tensor (bf16 included) or a sequence."""
    if is_torch(x):
        import torch

        t = x.detach().cpu().contiguous()  # type: ignore[attr-defined]
        name = _TORCH_RAW.get(str(t.dtype))
        if name is not None:  # numpy has no such dtype: go through the raw bits
            return t.view(torch.uint8 if t.element_size() == 1 else torch.int16).numpy().view(numpy_dtype(name))
        return t.numpy()
    return np.asarray(x)


def to_torch(a: np.ndarray, dtype: str) -> object:
    import torch

    a = np.asarray(a, order="C")  # keeps 0-d arrays 0-d
    torch_name = next((k for k, v in _TORCH_RAW.items() if v == dtype), None)
    if torch_name is not None:
        raw = a.view(np.uint8 if a.dtype.itemsize == 1 else np.int16)
        return torch.from_numpy(raw).view(getattr(torch, torch_name.removeprefix("torch.")))
    return torch.from_numpy(a)


# torch dtypes numpy cannot hold, and the signature dtype each is exchanged as.
_TORCH_RAW = {
    "torch.bfloat16": "bf16",
    "torch.float8_e4m3fn": "f8e4m3fn",
    "torch.float8_e4m3fnuz": "f8e4m3fnuz",
    "torch.float8_e5m2": "f8e5m2",
    "torch.float8_e5m2fnuz": "f8e5m2fnuz",
}


def cast_signature(signature, casts: tuple[tuple[str, str], ...]):
    """The signature an artifact with `interface_casts` really has."""
    from dataclasses import replace

    table = dict(casts)
    if not table:
        return signature
    swap = lambda specs: tuple(replace(s, dtype=table.get(s.dtype, s.dtype)) for s in specs)  # noqa: E731
    return replace(signature, inputs=swap(signature.inputs), outputs=swap(signature.outputs))


def cast_inputs(arrays: list[np.ndarray], model_sig, artifact_sig) -> list[np.ndarray]:
    """Model-typed inputs as the artifact's types. Integers must fit: a value the
    narrower type cannot hold is refused, never wrapped around."""
    from hxc.errors import SignatureError

    out = []
    for i, (a, m, s) in enumerate(zip(arrays, model_sig.inputs, artifact_sig.inputs)):
        if m.dtype == s.dtype:
            out.append(a)
            continue
        want = numpy_dtype(s.dtype)
        if want.kind in "iu" and a.size:
            info = np.iinfo(want)
            lo, hi = a.min(), a.max()
            if lo < info.min or hi > info.max:
                raise SignatureError(
                    f"input {i} ({m.name}) holds {lo}..{hi}; this artifact computes {m.dtype} as {s.dtype} "
                    f"(range {info.min}..{info.max})",
                    hint="choose an artifact with native 64-bit integers, e.g. device='vulkan:desktop' or a CPU one",
                )
        out.append(a.astype(want))
    return out


def cast_outputs(arrays: list[np.ndarray], model_sig) -> list[np.ndarray]:
    """Artifact outputs back as the model's types (widening, or f32 rounded to f16/bf16)."""
    return [a if a.dtype == numpy_dtype(m.dtype) else a.astype(numpy_dtype(m.dtype)) for a, m in zip(arrays, model_sig.outputs)]
