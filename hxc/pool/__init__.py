"""Every usable device of a host as one pool: a worker process per device, a scheduler
that splits a batch across them by measured speed, deadlines, restarts and telemetry.

    from hxc.pool import Pool
    with Pool("model.hxc") as pool:        # every device; or Pool("model.hxc", ["cpu", "vulkan"], pin="split")
        y = pool(x)                        # one batch, split across every device
        for y in pool.map(batches): ...    # a stream, results in input order
        print(pool.explain(), pool.stats())

In three parts: `workers.py` (the worker processes of a bundle: start, health,
restart), `split.py` (one batch or stream split across them; `pool.py` is the `Pool`
around it), `router.py` (single requests, as a server gets them, ranked by the
registered policies in `policies/`) and `lm_router.py` (a language model's sequences,
batched continuously in each worker: KV admission, preemption, failover). Apart from
them, `pipeline.py` runs a staged bundle's stages over worker processes of its own
(`pipeline_child.py`), tensors passing from worker to worker in shared memory:
`load_pipeline("staged.hxc", placement="0:cpu,1:vulkan", pin="split")`.

The names below are imported when first used, so that `hxc.pool.policies` (the
policy names the CLI lists) costs no process machinery to import.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "DeviceStats": "pool", "Pool": "pool", "PoolStats": "pool", "Workers": "workers", "Backoff": "worker",
    "Deadlines": "worker", "Health": "worker", "RequestFailed": "worker", "Result": "worker", "Worker": "worker",
    "WorkerFailed": "worker", "WorkerStats": "worker", "run_isolated": "worker", "Pipeline": "pipeline",
    "load_pipeline": "pipeline",
}  # fmt: skip

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'hxc.pool' has no attribute {name!r}")
    return getattr(importlib.import_module(f"hxc.pool.{_WHERE[name]}"), name)
