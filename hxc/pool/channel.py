"""How a pool talks to its worker processes: small JSON messages over a Unix
SEQPACKET socket pair, and tensors in shared memory.

Tensors never travel through the socket. Each side owns anonymous shared memory
(`memfd_create`) that it grows when a tensor does not fit, handing the new file
descriptor to the other side with the message that first uses it (SCM_RIGHTS). A
message then names tensors by (buffer, offset, shape, dtype), and the reader views
them in place. Nothing is left behind in /dev/shm when a process dies: a memfd lives
exactly as long as some process holds it.

The worker protocol (version `PROTOCOL`; a worker that speaks another is refused when
it says it is ready). The pool sends `{"op": ..., "id": n, ...}`:
- `call`: `function` (default `main`) on `inputs` in the pool's buffer for `slot`; with
  `state`, the named state the worker holds is read and replaced on its device;
- `open` / `drop`: allocate (zero) or free state `state` on the worker's device;
- `export`: state `state` copied to the host, its values (`names`) as outputs;
- `import`: `inputs` (the values of `names`) copied to the device as state `state`;
- `generate` (a language model's worker): `inputs` is a prompt's token ids (int32),
  `params` its sampling and limits; the worker batches it with the others and answers
  in parts, each with the new `tokens`, the last with `finish_reason`;
- `cancel`: stop generate request `id` now (its last part says "cancelled");
- `stop`.
The worker answers each request with `done` (outputs in its buffer for the slot,
`device_ms`, `worker_ms`, `state_bytes`: the device memory its states hold) or `error`;
a reply may come in several parts, each `done` with `"more": true` before the last.
"""

from __future__ import annotations

import json
import mmap
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

PROTOCOL = 3  # 1: one operation, run main; 2: functions, state, parts; 3: generate, cancel

MAX_MESSAGE = 1 << 16  # JSON control messages only; tensors go through shared memory
MAX_FDS = 8
ALIGN = 64
MIN_BUFFER = 1 << 20


class ChannelClosed(Exception):
    """The other end of the socket is gone (its process exited or was killed)."""


class SharedBuffer:
    """Anonymous shared memory of a fixed size, mapped into this process."""

    def __init__(self, size: int, fd: int | None = None) -> None:
        if fd is None:
            fd = os.memfd_create("hxc-pool", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
        self.fd = fd
        self.size = size
        self.map = mmap.mmap(fd, size)

    @classmethod
    def at_least(cls, nbytes: int) -> SharedBuffer:
        size = MIN_BUFFER
        while size < nbytes:
            size *= 2
        return cls(size)

    def view(self, ref: ArrayRef, dtype: np.dtype) -> np.ndarray:
        count = int(np.prod(ref.shape, dtype=np.int64))
        return np.frombuffer(self.map, dtype=dtype, count=count, offset=ref.offset).reshape(ref.shape)

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:
            pass  # a view still exists somewhere; the mapping goes when it does
        os.close(self.fd)


@dataclass(frozen=True)
class ArrayRef:
    """Where one tensor lies in a shared buffer."""

    offset: int
    shape: tuple[int, ...]

    def to_json(self) -> list:
        return [self.offset, list(self.shape)]

    @classmethod
    def from_json(cls, data: list) -> ArrayRef:
        return cls(int(data[0]), tuple(int(d) for d in data[1]))


def layout(shapes: Sequence[tuple[int, ...]], itemsizes: Sequence[int]) -> tuple[list[ArrayRef], int]:
    """Offsets for tensors packed one after another (aligned), and the bytes they need."""
    refs, offset = [], 0
    for shape, itemsize in zip(shapes, itemsizes):
        refs.append(ArrayRef(offset, tuple(shape)))
        nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
        offset += -(-nbytes // ALIGN) * ALIGN
    return refs, offset


def write_arrays(buffer: SharedBuffer, refs: Sequence[ArrayRef], arrays: Sequence[np.ndarray]) -> None:
    for ref, a in zip(refs, arrays):
        if a.size:
            buffer.view(ref, a.dtype)[...] = a


class Channel:
    """One end of the control socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def pair(cls) -> tuple[Channel, socket.socket]:
        """This side's channel and the other side's socket (to hand to a child)."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(mine), theirs

    def send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        data = json.dumps(message, separators=(",", ":")).encode()
        try:
            if fds:
                socket.send_fds(self.sock, [data], list(fds))
            else:
                self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError, OSError) as e:
            raise ChannelClosed(str(e)) from None

    def receive(self, timeout: float | None = None) -> tuple[dict[str, Any], list[int]]:
        """The next message and any file descriptors sent with it. Raises TimeoutError
        when `timeout` seconds pass, ChannelClosed when the other side is gone."""
        self.sock.settimeout(timeout)
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_MESSAGE, MAX_FDS)
        except TimeoutError:
            raise
        except (ConnectionResetError, OSError) as e:
            raise ChannelClosed(str(e)) from None
        if not data:
            for fd in fds:
                os.close(fd)
            raise ChannelClosed("end of stream")
        return json.loads(data), fds

    def pending(self) -> bool:
        """Whether a message (or the end of the stream) is waiting to be received."""
        import select

        return bool(select.select([self.sock], [], [], 0)[0])

    def close(self) -> None:
        self.sock.close()
