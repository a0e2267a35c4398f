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
}


def numpy_dtype(name: str) -> np.dtype:
    """The host dtype for a signature dtype; bf16 is ml_dtypes.bfloat16 (an IREE dependency)."""
    if name == "bf16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(DTYPES[name])


def dtype_name(dtype: np.dtype) -> str | None:
    for name in DTYPES:
        if numpy_dtype(name) == dtype:
            return name
    return None


def to_device(device: rt.HalDevice, array: np.ndarray, dtype: str) -> rt.HalBufferView:
    """Copy a host array into a new device-local buffer view."""
    array = np.ascontiguousarray(array)
    if dtype == "bf16":
        array = array.view(np.uint16)  # the buffer protocol does not carry ml_dtypes types
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


def is_torch(x: object) -> bool:
    """A torch tensor, recognised without importing torch."""
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def to_numpy(x: object) -> np.ndarray:
    """A host array for a numpy array, a torch tensor (bf16 included) or a sequence."""
    if is_torch(x):
        import torch

        t = x.detach().cpu().contiguous()  # type: ignore[attr-defined]
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(numpy_dtype("bf16"))
        return t.numpy()
    return np.asarray(x)


def to_torch(a: np.ndarray, dtype: str) -> object:
    import torch

    a = np.ascontiguousarray(a)
    if dtype == "bf16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)
