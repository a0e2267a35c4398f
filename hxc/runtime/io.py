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
from hxc.dtypes import dtype, to_storage


def to_device(device: rt.HalDevice, array: np.ndarray, name: str) -> rt.HalBufferView:
    """Copy a host array of hxc dtype `name` into a new device-local buffer view."""
    # Not np.ascontiguousarray: it turns a scalar (0-d array) into shape (1,).
    array = to_storage(np.asarray(array, order="C"))  # the buffer protocol does not carry ml_dtypes types
    return device.allocator.allocate_buffer_copy(
        memory_type=rt.MemoryType.DEVICE_LOCAL,
        allowed_usage=rt.BufferUsage.DEFAULT,
        device=device,
        buffer=array,
        element_type=dtype(name).iree_element_type(),
    )


def to_host(device: rt.HalDevice, view: rt.HalBufferView, name: str) -> np.ndarray:
    """Copy a device buffer view into a new host array of hxc dtype `name`."""
    shape = tuple(view.shape)
    host_dtype = dtype(name).numpy_dtype()
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
        want = dtype(s.dtype).numpy_dtype()
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
    out = []
    for a, m in zip(arrays, model_sig.outputs):
        want = dtype(m.dtype).numpy_dtype()
        out.append(a if a.dtype == want else a.astype(want))
    return out
