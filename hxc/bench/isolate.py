"""Each contender measured in a worker process of its own, one at a time.

A device can cost CPU in its process from the moment it exists (an IREE Vulkan device
on lavapipe keeps ~0.3 of a core busy while idle), so devices that share the host's
cores are never alive and running in one process; nor are two runtimes, or even two
sessions of one, which slow each other down (see `hxc.bench.measure`). Each group
(one contender, as `hxc bench` groups them) gets a worker process
(spawned, so no runtime state is inherited); the parent loads them one by one, then
lets them take turns: one phase of `Budget.phase_seconds` at a time, every other
worker stopped (SIGSTOP) meanwhile, so not even an idle device's threads run while
another device is timed. Turns alternate (CPU, Vulkan, CPU, Vulkan ...) so load from
other processes that comes and goes reaches every device alike. A worker that does
not finish its phase in time (lavapipe can hang in IREE 3.13) is killed, and the
other devices' results are kept.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from hxc.bench.measure import Budget, Contender, Phase, Timing, measure
from hxc.errors import BundleError, SignatureError, UsageError, first_line


@dataclass(frozen=True)
class DeviceGroup:
    """Contenders timed in one process, interleaved (`device` is the label shown for
    the group). `contenders` describe them in this process (never
    opened here when they run in a worker); `build` makes the same contenders in the
    worker, so it must pickle: a module-level function, or a functools.partial of one."""

    device: str
    contenders: list[Contender]
    build: Callable[[], list[Contender]]


@dataclass
class DeviceRun:
    """Per scenario (in order), the timings of every contender that was measured;
    `errors` names the devices that failed or hung, and why."""

    timings: list[list[Timing]]
    errors: list[str]


def measure_devices(groups: Sequence[DeviceGroup], scenarios: Sequence[list], budget: Budget = Budget(),
                    on_progress: Callable[[str], None] = lambda s: None) -> DeviceRun:  # fmt: skip
    """Time every group's contenders on each scenario's inputs, one device at a time."""
    if len(groups) == 1:  # nothing to keep apart: no process needed
        return DeviceRun([measure(groups[0].contenders, inputs, budget, on_progress) for inputs in scenarios], [])
    workers: list[_Worker] = []
    run = DeviceRun([], [])
    try:
        for g in groups:
            on_progress(f"starting a worker for {g.device}")
            workers.append(_Worker.start(g, budget))
        for inputs in scenarios:
            live = [w for w in workers if w.error is None]
            for w in live:
                on_progress(f"loading {', '.join(c.id for c in w.group.contenders)} on {w.group.device}")
                w.ask(("prepare", inputs), budget.hang_seconds)
                w.done = False
            while any(w.error is None and not w.done for w in live):
                for w in live:
                    if w.error is None and not w.done:
                        reply = w.ask(("run", budget.phase_seconds), budget.phase_seconds + budget.hang_seconds)
                        if reply is not None:
                            w.done, progress = reply
                            on_progress(f"{w.group.device}: {progress}")
            timings = []
            for w in live:
                if w.error is None and (reply := w.ask(("result",), budget.hang_seconds)) is not None:
                    by_id = {c.id: c for c in w.group.contenders}
                    timings += [Timing(contender=by_id[d.pop("id")], **d) for d in reply]
            run.timings.append(timings)
    finally:
        for w in workers:
            w.stop()
    run.errors = [w.error for w in workers if w.error is not None]
    return run


class _Worker:
    def __init__(self, group: DeviceGroup, process: Any, conn: Any) -> None:
        self.group = group
        self.process = process
        self.conn = conn
        self.error: str | None = None
        self.done = False

    @classmethod
    def start(cls, group: DeviceGroup, budget: Budget) -> _Worker:
        ctx = multiprocessing.get_context("spawn")  # forking a process with IREE or torch threads is unsafe
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_serve, args=(child, group.build, budget), daemon=True, name=f"hxc-bench {group.device}")
        process.start()
        child.close()
        w = cls(group, process, parent)
        w._receive(budget.hang_seconds)  # "ready": imports done, contenders built
        w._signal(signal.SIGSTOP)
        return w

    def ask(self, message: tuple, timeout: float) -> Any:
        """Send one request and wait for its answer, with the worker running only
        meanwhile. Returns None (and sets `error`) when the worker fails or hangs."""
        with self._awake():
            try:
                self.conn.send(message)
            except (OSError, EOFError):
                self._fail("its worker process is gone")
                return None
            return self._receive(timeout)

    def _receive(self, timeout: float) -> Any:
        try:
            if not self.conn.poll(timeout):
                self._fail(f"no answer within {timeout:.0f} s (hung?); stopped it")
                return None
            kind, payload = self.conn.recv()
        except (OSError, EOFError):
            self._fail(f"its worker process died (exit code {self.process.exitcode})")
            return None
        if kind == "error":
            self._fail(payload)
            return None
        if kind == "raise":
            self._fail(first_line(payload))
            raise payload
        return payload

    @contextmanager
    def _awake(self) -> Iterator[None]:
        self._signal(signal.SIGCONT)
        try:
            yield
        finally:
            if self.error is None:
                self._signal(signal.SIGSTOP)

    def _signal(self, sig: int) -> None:
        if self.process.pid is not None and self.process.is_alive():
            os.kill(self.process.pid, sig)

    def _fail(self, why: str) -> None:
        self.error = f"{self.group.device}: {why}"
        self.process.kill()

    def stop(self) -> None:
        if self.process.is_alive() and self.error is None:
            self._signal(signal.SIGCONT)
            try:
                self.conn.send(("exit",))
            except (OSError, EOFError):
                pass
            self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


def _serve(conn: Any, build: Callable[[], list[Contender]], budget: Budget) -> None:
    """The worker: builds its contenders, then answers the parent's requests."""
    os.dup2(2, 1)  # whatever the libraries print must not reach the parent's stdout (--json)
    phase: Phase | None = None
    try:
        contenders = build()
        conn.send(("ready", None))
        while True:
            request = conn.recv()
            if request[0] == "prepare":
                if phase is not None:
                    phase.close()
                phase = Phase(contenders, request[1], budget)
                conn.send(("prepared", None))
            elif request[0] == "run":
                assert phase is not None
                phase.run(request[1])
                conn.send(("ran", (phase.done, phase.progress)))
            elif request[0] == "result":
                assert phase is not None
                conn.send(("result", [_plain(t) for t in phase.timings]))
            else:
                break
    except (UsageError, BundleError, SignatureError) as e:
        # The user's mistake or a bundle that fails its checks, not a device failing: the
        # parent raises it as it would have in one process (exit codes included).
        conn.send(("raise", e))
    except Exception as e:  # reported to the parent, which keeps the other devices' results
        conn.send(("error", first_line(e)))
    finally:
        if phase is not None:
            phase.close()


def _plain(t: Timing) -> dict:
    return {"id": t.contender.id, "load_ms": t.load_ms, "first_call_ms": t.first_call_ms, "memory_mb": t.memory_mb,
            "latencies_ms": t.latencies_ms, "interleaved_with": t.interleaved_with, "other_load": t.other_load,
            "block_medians_ms": t.block_medians_ms}  # fmt: skip
