"""The worker process: one artifact of one bundle on one device, serving the pool.

It loads through `hxc.runtime.load` (so the bytes it maps are the bytes it hashed,
and any backend the loader knows runs), warms up, says it is ready, and then runs
one request at a time: inputs are read in place from the pool's shared memory,
outputs written to its own. It exits when the pool says stop, when the control
socket closes, or when its parent process is gone.

Started as `python -c BOOTSTRAP CONFIG` (see `worker.py`): the bootstrap pins the
process to its CPUs before anything starts a thread, so every thread inherits them.

Fault injection, for tests only: `HXC_POOL_FAULT="<who>:<what>@<n>[,...]"` makes the
first incarnation of a worker whose artifact id or driver is <who> misbehave on its
n-th request: `hang` (never answers), `slow` (answers 5 s late), `crash` (SIGKILLs
itself), `segv` (a real segmentation fault). A restarted worker behaves. One more for
a language model's worker, in every incarnation: `<who>:slowstep@<ms>` makes each
batch step take <ms> milliseconds more (a slow device, to test what happens while
sequences run).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import Any

FAULT_ENV = "HXC_POOL_FAULT"
SLOW_S = 5.0  # how late a `slow` fault answers


def main(config: dict[str, Any]) -> None:
    from hxc.pool.channel import PROTOCOL, Channel, ChannelClosed

    import socket

    channel = Channel(socket.socket(fileno=config["fd"]))
    _exit_with_parent()
    cpus = config.get("cpus")
    if config.get("protocol") != PROTOCOL:
        channel.send({"op": "failed", "message": f"this worker speaks protocol {PROTOCOL}, not {config.get('protocol')}",
                      "exit_code": 1})  # fmt: skip
        sys.exit(1)
    try:
        if cpus:
            import iree.runtime as rt

            # Must be parsed before the first local-task device exists in this process.
            rt.flags.parse_flags("--task_topology_cpu_ids=" + ",".join(map(str, cpus)))
        model, ready = _load(config)
    except Exception as e:  # noqa: BLE001 - every load failure goes back as one line
        from hxc.errors import first_line

        channel.send({"op": "failed", "message": first_line(e), "exit_code": int(getattr(e, "exit_code", 1))})
        sys.exit(1)
    if cpus:
        _pin_all_threads(cpus)
    # Inputs sit in the pool's shared memory, unchanged until this worker replies: a
    # CPU device reads them in place (one copy per row less than a plain call would make).
    model.borrow_inputs()
    channel.send({"op": "ready", "protocol": PROTOCOL, **ready})
    faults = _faults(os.environ.get(FAULT_ENV, ""), model, config.get("incarnation", 1))
    try:
        if model.manifest.language_model is not None:
            _serve_generate(channel, model, faults)
        else:
            _serve(channel, model, faults)
    except ChannelClosed:
        pass
    os._exit(0)  # skip IREE's teardown: the process is done and the pool may be gone


def _load(config: dict[str, Any]):
    import numpy as np

    import hxc.runtime

    t0 = time.perf_counter()
    model = hxc.runtime.load(config["bundle"], device=config["artifact"], **{"strict": True, **config.get("load", {})})
    load_ms = (time.perf_counter() - t0) * 1000
    # The first call sets up pipelines (seconds on lavapipe); do it before saying ready
    # so the first real request is timed like every other.
    warmup: float | str
    lm_timing: dict[str, float] | None = None
    t0 = time.perf_counter()
    try:
        from hxc.dtypes import dtype

        if model.manifest.stateless_main:  # a model of functions warms up on its first calls
            zeros = [np.zeros([d if isinstance(d, int) else 1 for d in s.shape], dtype(s.dtype).numpy_dtype())
                     for s in model.signature.inputs]  # fmt: skip
            model.run_flat(zeros)
        elif model.manifest.language_model is not None:  # a prefill chunk and a decode step, on a throwaway cache
            from hxc.runtime.batching import Batch

            batch = Batch(model)
            batch.add(0, [0], 2, stop_token_ids=[])
            while not batch.idle:
                batch.step()
            lm_timing = _time_generation(model, batch.lm)
        warmup = (time.perf_counter() - t0) * 1000
    except Exception as e:  # noqa: BLE001 - a model that rejects zeros still serves real inputs
        warmup = f"warm-up call failed: {e}".splitlines()[0]
    ready = {"pid": os.getpid(), "artifact": model.candidate.id, "device": model.device.label, "load_ms": load_ms,
             "warmup_ms": warmup if isinstance(warmup, float) else None, "threads": threading.active_count(),
             "native_threads": len(os.listdir("/proc/self/task")), "cpus": sorted(os.sched_getaffinity(0)),
             "lm_timing": lm_timing}  # fmt: skip
    return model, ready


def _time_generation(model, lm) -> dict[str, float]:
    """A language model's speed here, roughly, once its pipelines are set up: a prompt of
    its largest prefill chunk read in one call, and decode steps of one sequence. What
    the router estimates a device by before anything else is measured there (one
    sample each, taken while other workers may be starting: the router's live
    measurements correct it)."""
    from hxc.runtime.batching import Batch

    n = max(1, min(max(lm.chunks), lm.max_context - 4))
    batch = Batch(model)
    batch.add(0, [3 + i % max(1, lm.vocab_size - 3) for i in range(n)], 4, stop_token_ids=[])
    times = []
    while not batch.idle:  # 3 steps: the prefill (and the first decode with it), then two decodes
        t0 = time.perf_counter()
        batch.step()
        times.append((time.perf_counter() - t0) * 1000)
    step = min(times[1:]) if len(times) > 1 else times[0] / 2
    return {"prefill_tokens": n, "prefill_ms": max(0.0, times[0] - step), "step_ms": step}


def _serve(channel, model, faults: dict[int, str]) -> None:
    from hxc.errors import first_line
    from hxc.pool.channel import SharedBuffer

    inputs: dict[int, SharedBuffer] = {}  # slot -> the pool's buffer
    outputs: dict[int, SharedBuffer] = {}  # slot -> ours
    states: dict[str, Any] = {}  # reference -> the ModelState this worker holds
    served = 0
    while True:
        message, fds = channel.receive()
        if message["op"] == "stop":
            return
        slot = _adopt_input(inputs, message, fds)
        served += 1
        _inject(faults.get(served))
        t0 = time.perf_counter()
        try:
            results = _operate(model, message, inputs.get(slot), states)
        except Exception as e:  # noqa: BLE001 - a bad request fails alone; the worker keeps serving
            channel.send({"op": "error", "id": message["id"], "message": first_line(e),
                          "exit_code": int(getattr(e, "exit_code", 1)), "state_bytes": _held(states)})  # fmt: skip
            continue
        device_ms = model.last_device_ms if message["op"] in ("call", "run") else 0.0
        _reply(channel, outputs, slot, message["id"], results, device_ms, t0, _held(states))


def _serve_generate(channel, model, faults: dict[int, str]) -> None:
    """A language model's worker: continuous batching (`hxc.runtime.batching.Batch`).

    `generate` requests (a prompt's token ids in the pool's buffer, sampling in
    `params`) wait here until a slot is free, then join the batch; between two steps
    every message that arrived is handled, so a new sequence joins the next step and a
    `cancel` frees its slot before it. Each step's tokens go back as parts of each
    sequence's reply (`{"tokens": [...], "more": true}`); its last reply carries the
    last tokens and `finish_reason` (stop, length, or cancelled). Other operations
    (calls of prefill/decode on a state of their own) run as in `_serve`, between steps."""
    import collections

    import numpy as np

    from hxc.errors import first_line
    from hxc.pool.channel import ArrayRef, SharedBuffer
    from hxc.runtime.batching import Batch
    from hxc.runtime.generate import Sampling

    inputs: dict[int, SharedBuffer] = {}
    outputs: dict[int, SharedBuffer] = {}
    states: dict[str, Any] = {}
    batch = Batch(model)
    step_delay_s = float(faults.pop(0, 0)) / 1000  # the `slowstep` fault (tests)
    waiting: collections.deque = collections.deque()  # (id, prompt ids, params), oldest first
    started: dict[int, float] = {}  # id -> when it arrived (its reply's worker_ms)
    served = 0

    def finish(request: int, tokens: list[int], reason: str) -> None:
        t0 = started.pop(request, time.perf_counter())
        channel.send({"op": "done", "id": request, "outputs": [], "tokens": tokens, "finish_reason": reason, "device_ms": 0.0,
                      "worker_ms": (time.perf_counter() - t0) * 1000, "size": 0, "state_bytes": _held(states)})  # fmt: skip

    def fail(request: int, error: Exception) -> None:
        started.pop(request, None)
        channel.send({"op": "error", "id": request, "message": first_line(error),
                      "exit_code": int(getattr(error, "exit_code", 1)), "state_bytes": _held(states)})  # fmt: skip

    def handle(message: dict, fds: list[int]) -> bool:
        nonlocal served
        op = message["op"]
        if op == "stop":
            return False
        if op == "cancel":
            request = message["id"]
            if batch.cancel(request) or any(w[0] == request for w in waiting):
                for w in [w for w in waiting if w[0] == request]:
                    waiting.remove(w)
                finish(request, [], "cancelled")
            return True
        slot = _adopt_input(inputs, message, fds)
        served += 1
        _inject(faults.get(served))
        if op != "generate":
            t0 = time.perf_counter()
            try:
                results = _operate(model, message, inputs.get(slot), states)
            except Exception as e:  # noqa: BLE001 - a bad request fails alone
                fail(message["id"], e)
                return True
            _reply(channel, outputs, slot, message["id"], results, model.last_device_ms, t0, _held(states))
            return True
        started[message["id"]] = time.perf_counter()
        try:
            ref = ArrayRef.from_json(message["inputs"][0])
            ids = inputs[slot].view(ref, np.dtype(np.int32)).tolist()  # copied: the buffer is the pool's again
            params = message.get("params") or {}
            sampling = Sampling(float(params.get("temperature", 0.0)), int(params.get("top_k", 0)),
                                float(params.get("top_p", 1.0)), params.get("seed"))  # fmt: skip
        except Exception as e:  # noqa: BLE001
            fail(message["id"], e)
            return True
        waiting.append((message["id"], ids, params, sampling))
        return True

    while True:
        # Idle: wait for a message. Busy: take what has arrived, then step.
        block = batch.idle and not waiting
        while block or channel.pending():
            message, fds = channel.receive()
            block = False
            if not handle(message, fds):
                return
        while waiting and batch.free_slots:
            request, ids, params, sampling = waiting.popleft()
            try:
                batch.add(request, ids, int(params.get("max_new_tokens", 16)), sampling, params.get("stop_token_ids"))
            except Exception as e:  # noqa: BLE001 - a bad prompt fails alone
                fail(request, e)
        if batch.idle:
            continue
        if step_delay_s:
            time.sleep(step_delay_s)
        try:
            events = batch.step()
        except Exception as e:  # noqa: BLE001 - the device call failed: every sequence in it fails, the worker goes on
            running = batch.running
            batch = Batch(model)
            for request in running:
                fail(request, e)
            continue
        if not events:  # a prefill chunk that chose no token yet: say the worker is alive
            channel.send({"op": "done", "id": batch.running[0], "more": True, "tokens": []})
            continue
        by_id: dict[int, list[int]] = {}
        done: dict[int, str] = {}
        for event in events:
            by_id.setdefault(event.id, []).append(event.token)
            if event.finish:
                done[event.id] = event.finish
        for request, tokens in by_id.items():
            if request in done:
                finish(request, tokens, done[request])
            else:
                channel.send({"op": "done", "id": request, "more": True, "tokens": tokens})


def _operate(model, message: dict, buffer, states: dict[str, Any]) -> list:
    """One request's outputs (host arrays), by its operation."""
    from hxc.dtypes import dtype
    from hxc.pool.channel import ArrayRef

    op, ref = message["op"], message.get("state")

    def read(specs) -> list:
        return [buffer.view(ArrayRef.from_json(r), dtype(s.dtype).numpy_dtype()) for r, s in zip(message["inputs"], specs)]

    def held() -> Any:
        if ref not in states:
            from hxc.errors import HxcError

            raise HxcError(f"this worker holds no state {ref!r} (opened elsewhere, dropped, or lost in a restart)")
        return states[ref]

    if op in ("call", "run"):  # `run`: protocol 1's only operation, main
        function = message.get("function", "main")
        arrays = read(model.functions[function].signature.inputs)
        if ref is None and function == "main" and model.manifest.stateless_main:
            return model.run_flat(arrays)
        return model.call_flat(function, arrays, state=held() if ref is not None else None)
    specs = model.state_specs
    if op == "open":
        states[ref] = model.new_state()
        return []
    if op == "drop":
        held()
        del states[ref]
        return []
    if op == "export":
        values = held().to_host()
        return [values[n] for n in message["names"]]
    if op == "import":
        names = message["names"]
        arrays = read([specs[n].tensor() for n in names])
        states[ref] = model.import_state(dict(zip(names, (a.copy() for a in arrays))))
        return []
    raise ValueError(f"unknown operation {op!r}")


def _held(states: dict[str, Any]) -> int:
    return sum(s.nbytes for s in states.values())


def _reply(channel, outputs: dict, slot: int, request: int, results: list, device_ms: float, t0: float,
           state_bytes: int) -> None:  # fmt: skip
    from hxc.pool.channel import SharedBuffer, layout, write_arrays

    refs, nbytes = layout([r.shape for r in results], [r.dtype.itemsize for r in results])
    new_fd: list[int] = []
    if slot not in outputs or outputs[slot].size < nbytes:
        if slot in outputs:
            outputs[slot].close()
        outputs[slot] = SharedBuffer.at_least(nbytes)
        new_fd = [outputs[slot].fd]
    write_arrays(outputs[slot], refs, results)
    reply = {"op": "done", "id": request, "outputs": [r.to_json() for r in refs], "device_ms": device_ms,
             "worker_ms": (time.perf_counter() - t0) * 1000, "size": outputs[slot].size,
             "state_bytes": state_bytes}  # fmt: skip
    channel.send(reply, new_fd)


def _faults(spec: str, model, incarnation: int) -> dict[int, str]:
    """{request number: fault} for this worker, from HXC_POOL_FAULT; key 0 holds a
    `slowstep` (its milliseconds)."""
    out = {}
    for item in spec.split(",") if spec else ():
        who, _, rest = item.strip().rpartition(":")
        what, _, n = rest.partition("@")
        if who not in (model.candidate.id, model.device.driver):
            continue
        if what == "slowstep":
            out[0] = n
        elif what in ("hang", "slow", "crash", "segv") and incarnation == 1:
            out[int(n or 1)] = what
    return out


def _adopt_input(inputs: dict[int, Any], message: dict, fds: list) -> int:
    """The request's input slot; a buffer passed with it replaces that slot's old one."""
    from hxc.pool.channel import SharedBuffer

    slot = message["slot"]
    if fds:
        if slot in inputs:
            inputs[slot].close()
        inputs[slot] = SharedBuffer(message["size"], fds[0])
    return slot


def _inject(fault: str | None) -> None:
    if fault == "hang":
        while True:
            time.sleep(3600)
    if fault == "slow":
        time.sleep(SLOW_S)
    if fault == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "segv":
        ctypes.string_at(0)


def _exit_with_parent() -> None:
    """Exit when the pool's process is gone, even mid-call: an orphaned worker would
    hold its device (and a hung one would spin) forever."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, name="hxc-parent-watch", daemon=True).start()


def _pin_all_threads(cpus: list[int]) -> None:
    # Threads inherit the process's CPUs, but some libraries reset their own (Mesa's
    # shader-cache thread asks for every CPU): pin them all again once loaded.
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass


# `python -c BOOTSTRAP CONFIG_JSON`: pin first, then import anything.
BOOTSTRAP = (
    "import json, os, sys; c = json.loads(sys.argv[1]); "
    "c.get('cpus') and os.sched_setaffinity(0, c['cpus']); "
    "from hxc.pool.child import main; main(c)"
)
