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
from hxc.dtypes import dtype


def to_device(device: rt.HalDevice, array: np.ndarray, name: str) -> rt.HalBufferView:
    """Copy a host array of hxc dtype `name` into a new device-local buffer view."""
    array = np.ascontiguousarray(array)
    if name == "bf16":
        array = array.view(np.uint16)  # the buffer protocol does not carry ml_dtypes types
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


