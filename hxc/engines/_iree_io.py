"""Moving tensors between host memory and an IREE device, on every driver.

iree.runtime's own paths (`asdevicearray`, `DeviceArray.to_host`) import host memory
into the device. Vulkan requires such memory to be aligned to
minImportedHostPointerAlignment (4096 on Mesa's lavapipe), which numpy arrays are
not, so they fail there with "host allocation import pointer does not satisfy ...".
hxc never imports host pointers: inputs are copied into device-owned buffers, and
outputs that the host cannot map are read back through a mappable staging buffer
with a queue copy, as a GPU application would. `Transfers` is the per-call path: it
takes shortcuts where they do the same thing (see there).
"""

from __future__ import annotations

from typing import Any

import numpy as np

import iree.runtime as rt
from hxc.dtypes import dtype, to_storage
from hxc.engines.base import TRANSFERS
from hxc.manifests.schema import Signature


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


class Transfers:
    """Host arrays to and from one IREE device for one signature, with everything that
    does not change between calls looked up once: each input's HAL element type and
    whether it can go to the device as it is, and how each output comes back.

    The general paths are `to_device` / `to_host` (every driver, every dtype).
    Two shortcuts, taken only where they do the same thing: a C-contiguous input of a
    dtype the buffer protocol carries is copied into a new device buffer directly; an
    output of a host-memory device (`HOST_MEMORY_DRIVERS`) is copied out through
    DLPack, which costs about half what mapping the buffer does (3.8 vs 6.1 µs for a
    16 KB output), since the device pointer of such a buffer is a host pointer."""

    def __init__(self, device: rt.HalDevice, host_memory: bool, signature: Signature) -> None:
        self.device = device
        self.signature = signature
        self.host_memory = host_memory
        self._list = rt.VmVariantList
        self._copy = device.allocator.allocate_buffer_copy
        self._import = device.allocator.import_host_allocation
        self._memory, self._usage = rt.MemoryType.DEVICE_LOCAL, rt.BufferUsage.DEFAULT  # as to_device
        self._view_type = rt.HalBufferView
        # (hxc dtype, IREE element type, buffer protocol carries it) per input.
        self._inputs = [(s.dtype, dtype(s.dtype).iree_element_type(), dtype(s.dtype).numpy_native) for s in signature.inputs]
        # (hxc dtype, numpy dtype, DLPack may carry it) per output. DLPack has no
        # bool or ml_dtypes types that numpy reads; those take to_host.
        self._outputs = []
        for s in signature.outputs:
            want = dtype(s.dtype).numpy_dtype()
            self._outputs.append((s.dtype, want, host_memory and want.kind in "fiu" and dtype(s.dtype).numpy_native))

    def upload(self, arrays: list[np.ndarray], borrow: bool = False, extra: int = 0) -> Any:
        """Device buffers for `arrays`: copies, or with `borrow` on a host-memory device
        the arrays' own memory (the caller keeps them unchanged and alive until the
        call returns). Borrowing saves a copy per call: 1.7 ms of a 23 ms call for
        50,000 MLP rows of 256 bytes."""
        args = self._list(len(arrays) + extra)  # `extra`: room for state the caller pushes after them
        TRANSFERS.to_device += len(arrays)
        for a, (name, element_type, direct) in zip(arrays, self._inputs):
            if direct and a.flags.c_contiguous:
                # IREE's CPU code assumes its buffers 64-byte aligned; it imports one that is
                # not without complaint and then crashes (SIGSEGV, 4 bytes off): copy those.
                if borrow and self.host_memory and a.size and a.ctypes.data % BORROW_ALIGNMENT == 0:
                    buffer = self._import(a, self._memory | rt.MemoryType.HOST_VISIBLE, self._usage)
                    args.push_ref(rt.HalBufferView(buffer, a.shape, element_type))
                    continue
                args.push_ref(self._copy(self._memory, self._usage, self.device, a, element_type))
            else:
                args.push_ref(to_device(self.device, a, name))
        return args

    def results(self) -> Any:
        return self._list(len(self._outputs))

    def download(self, results: Any) -> list[np.ndarray]:
        TRANSFERS.to_host += len(self._outputs)
        out = []
        for i, (name, want, dlpack) in enumerate(self._outputs):
            view = results.get_as_object(i, self._view_type)
            if dlpack:
                a = np.from_dlpack(_DLPack(self.device.create_dlpack_capsule(view, _DLPACK_CPU, 0)))
                if a.dtype == want:
                    out.append(a.copy())  # own the bytes: the device buffer is IREE's to reuse
                    continue
            out.append(to_host(self.device, view, name))
        return out


# HAL drivers whose buffers live in host memory: the device pointer DLPack exports is
# a host pointer, so numpy can read it. Every other driver (Vulkan, lavapipe included,
# CUDA, HIP) reads back through to_host.
HOST_MEMORY_DRIVERS = frozenset({"local-task", "local-sync"})
BORROW_ALIGNMENT = 64  # IREE_HAL_HEAP_BUFFER_ALIGNMENT: what a host-memory device may read in place
_DLPACK_CPU = 1  # kDLCPU


class _DLPack:
    """What `np.from_dlpack` takes: an object with `__dlpack__`, around IREE's capsule."""

    __slots__ = ("capsule",)

    def __init__(self, capsule: Any) -> None:
        self.capsule = capsule

    def __dlpack__(self, **_: Any) -> Any:
        return self.capsule

    def __dlpack_device__(self) -> tuple[int, int]:
        return (_DLPACK_CPU, 0)
