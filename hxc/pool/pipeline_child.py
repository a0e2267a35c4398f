"""A pipeline's worker process: some stages of a staged bundle on one device
(`pipeline.py` is the parent's side).

It opens only the artifacts of its own stages (each stage's artifact of the target the
device runs, with that stage's weights archive alone: `hxc.runtime.loader.load_stage`),
calls each contiguous range's stages in order, warms each range up, says it is ready, and then runs one call at a time. Every
tensor it reads or writes lies in shared memory that the pipeline owns, one buffer per
item slot and stage boundary, handed over once per worker (SCM_RIGHTS): a call names
the range, the slot, and where the range's inputs lie in the buffer of its first
boundary; the outputs go into the buffer of the boundary after its last stage, and
the reply says where. So a tensor between two workers is written once, by the worker
before the cut, and read in place by the one after it; the parent passes offsets only.

Started as `python -c BOOTSTRAP CONFIG` (pinned before anything starts a thread, as the
pool's workers are). The protocol (version `PROTOCOL`), from the parent:
- `call`: `id`, `first` (the range's first stage), `slot`, `inputs` (refs in the buffer
  of boundary `first`), `buffers` (the [slot, boundary, size] of the fds sent with it,
  in order; a buffer replaces the one this worker held for that slot and boundary);
- `stop`.
Answers: `done` (`outputs`: refs in the buffer of boundary last + 1; `device_ms`;
`start`, `end`: time.monotonic() around the call, comparable between processes),
`grow` (`need`: the outputs need a larger buffer; nothing was written) or `error`.

Fault injection, for tests only, as the pool's (`child.py`): `HXC_POOL_FAULT` items
whose <who> is one of the worker's artifact ids or its driver: `hang`, `slow`, `crash`,
`segv` at the n-th call of its first incarnation; `slowstep@<ms>` slows every call of
every incarnation by <ms>.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

PROTOCOL = 1


@dataclass
class _Range:
    """Stages first..last on this worker's device, each its own `StageRunner`, called in
    order (a stage's outputs, as the model types them, are the next one's inputs)."""

    first: int
    last: int
    runners: list[Any]  # hxc.runtime.stages.StageRunner, one per stage
    input_types: list[np.dtype]  # stage `first`'s inputs, as the model types them
    device_seconds: float = 0.0  # the last call's, every stage's together

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        spent = 0.0
        for runner in self.runners:
            arrays = runner.invoke(arrays)
            spent += runner.session.device_seconds
        self.device_seconds = spent
        return arrays


def main(config: dict[str, Any]) -> None:
    from hxc.pool.channel import Channel, ChannelClosed
    from hxc.pool.child import _exit_with_parent, _pin_all_threads

    channel = Channel(socket.socket(fileno=config["fd"]))
    _exit_with_parent()
    if config.get("protocol") != PROTOCOL:
        channel.send({"op": "failed", "message": f"this pipeline worker speaks protocol {PROTOCOL}, "
                      f"not {config.get('protocol')}", "exit_code": 1})  # fmt: skip
        sys.exit(1)
    cpus = config.get("cpus")
    try:
        if cpus:
            import iree.runtime as rt

            # Must be parsed before the first local-task device exists in this process.
            rt.flags.parse_flags("--task_topology_cpu_ids=" + ",".join(map(str, cpus)))
        ranges, ready, names = _load(config)
    except Exception as e:  # noqa: BLE001 - every load failure goes back as one line
        from hxc.errors import first_line

        channel.send({"op": "failed", "message": first_line(e), "exit_code": int(getattr(e, "exit_code", 1))})
        sys.exit(1)
    if cpus:
        _pin_all_threads(cpus)
    channel.send({"op": "ready", "protocol": PROTOCOL, **ready})
    faults = _faults(os.environ.get("HXC_POOL_FAULT", ""), names, config.get("incarnation", 1))
    try:
        _serve(channel, ranges, faults)
    except ChannelClosed:
        pass
    os._exit(0)  # skip IREE's teardown: the process is done and the pipeline may be gone


def _load(config: dict[str, Any]) -> tuple[dict[int, _Range], dict[str, Any], set[str]]:
    """The worker's ranges by first stage, what it says when ready, and the names a
    fault may be aimed at."""
    from hxc.dtypes import dtype
    from hxc.errors import NoCompatibleArtifactError
    from hxc.manifests.bundle import read_bundle, trust_policy
    from hxc.runtime.loader import load_stage
    from hxc.runtime.probe import probe_host
    from hxc.runtime.select import select

    t0 = time.perf_counter()
    options = config.get("load", {})
    trust = {"trusted_keys": options.get("trusted_keys"), "min_sequence": options.get("min_sequence"),
             "require_signed_profiles": options.get("require_signed_profiles")}  # fmt: skip
    path, device = config["bundle"], config["device"]
    manifest = read_bundle(path, trust_policy(**trust)).manifest
    probe = probe_host()
    selection = select(manifest, probe, policy=options.get("policy", "latency"), device=device,
                       precision=options.get("precision"), tolerance=options.get("tolerance"))  # fmt: skip
    cand = selection.best
    if cand is None or not cand.stages:
        why = "; ".join(f"{r.artifact.id}: {r.reason}" for r in selection.rejected[:4]) or "the bundle has no stages"
        raise NoCompatibleArtifactError(f"no staged artifact can run on {device!r} ({why})")
    ranges: dict[int, _Range] = {}
    for first, last in config["ranges"]:
        # Each stage's artifact of the chain chosen for this device, checked and opened alone.
        runners = [load_stage(path, a.id, device=device, probe=probe, **trust) for a in cand.stages[first:last + 1]]
        for r in runners:
            if hasattr(r.session, "borrow_inputs"):
                # Inputs stay unchanged in the pipeline's shared memory (or in this worker)
                # until the call returns: a host-memory device reads them in place.
                r.session.borrow_inputs = True
        ranges[first] = _Range(first, last, runners, [dtype(t.dtype).numpy_dtype() for t in manifest.stages[first].inputs])
    load_ms = (time.perf_counter() - t0) * 1000
    # The first call sets up pipelines (seconds on lavapipe): before saying ready, so the
    # first real item is timed like every other.
    t0 = time.perf_counter()
    warmup: str | None = None
    for r in ranges.values():
        zeros = [np.zeros([d if isinstance(d, int) else 1 for d in t.shape], k)
                 for t, k in zip(manifest.stages[r.first].inputs, r.input_types)]  # fmt: skip
        try:
            r.run(zeros)
        except Exception as e:  # noqa: BLE001 - a model that rejects zeros still runs real inputs
            warmup = f"warm-up call failed: {e}".splitlines()[0]
    ready = {"pid": os.getpid(), "device": cand.device.label, "driver": cand.device.driver,
             "artifacts": [a.id for r in ranges.values() for a in cand.stages[r.first:r.last + 1]],
             "load_ms": load_ms, "warmup_ms": (time.perf_counter() - t0) * 1000, "warmup_error": warmup,
             "cpus": sorted(os.sched_getaffinity(0))}  # fmt: skip
    return ranges, ready, {*ready["artifacts"], cand.device.driver}


def _serve(channel, ranges: dict[int, _Range], faults: dict[int, str]) -> None:
    from hxc.errors import first_line
    from hxc.pool.channel import ArrayRef, SharedBuffer, layout, write_arrays
    from hxc.pool.child import _inject

    buffers: dict[tuple[int, int], SharedBuffer] = {}  # (slot, boundary) -> the pipeline's buffer
    delay_s = float(faults.pop(0, 0)) / 1000
    served = 0
    while True:
        message, fds = channel.receive()
        if message["op"] == "stop":
            return
        served += 1
        _inject(faults.get(served))
        for (slot, boundary, size), fd in zip(message.get("buffers", ()), fds):
            old = buffers.pop((slot, boundary), None)
            if old is not None:
                old.close()
            buffers[(slot, boundary)] = SharedBuffer(size, fd)
        start = time.monotonic()
        try:
            r = ranges[message["first"]]
            slot = message["slot"]
            source = buffers[(slot, r.first)]
            arrays = [source.view(ArrayRef.from_json(ref), t) for ref, t in zip(message["inputs"], r.input_types)]
            if delay_s:
                time.sleep(delay_s)
            results = r.run(arrays)
            del arrays
            device_ms = r.device_seconds * 1000
            refs, nbytes = layout([a.shape for a in results], [a.dtype.itemsize for a in results])
            target = buffers[(slot, r.last + 1)]
            if nbytes > target.size:
                channel.send({"op": "grow", "id": message["id"], "need": nbytes})
                continue
            write_arrays(target, refs, results)
        except Exception as e:  # noqa: BLE001 - one item fails alone; the worker goes on
            channel.send({"op": "error", "id": message["id"], "message": first_line(e),
                          "exit_code": int(getattr(e, "exit_code", 1))})  # fmt: skip
            continue
        channel.send({"op": "done", "id": message["id"], "outputs": [ref.to_json() for ref in refs],
                      "device_ms": device_ms, "start": start, "end": time.monotonic()})  # fmt: skip


def _faults(spec: str, names: set[str], incarnation: int) -> dict[int, str]:
    """{call number: fault} for this worker (the pool's `child._faults`, aimed by any of
    `names`); key 0 holds a `slowstep`'s milliseconds."""
    from types import SimpleNamespace

    from hxc.pool.child import _faults as pool_faults

    out: dict[int, str] = {}
    for name in sorted(names):  # the pool's parser aims by one artifact id or driver
        model = SimpleNamespace(candidate=SimpleNamespace(id=name), device=SimpleNamespace(driver=None))
        out.update(pool_faults(spec, model, incarnation))
    return out


# `python -c BOOTSTRAP CONFIG_JSON`: pin first, then import anything.
BOOTSTRAP = (
    "import json, os, sys; c = json.loads(sys.argv[1]); "
    "c.get('cpus') and os.sched_setaffinity(0, c['cpus']); "
    "from hxc.pool.pipeline_child import main; main(c)"
)
