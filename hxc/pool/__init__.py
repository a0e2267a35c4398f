"""Every usable device of a host as one pool: a worker process per device, a scheduler
that splits a batch across them by measured speed, deadlines, restarts and telemetry.

    from hxc.pool import Pool
    with Pool("model.hxc") as pool:        # every device; or Pool("model.hxc", ["cpu", "vulkan"], pin="split")
        y = pool(x)                        # one batch, split across every device
        for y in pool.map(batches): ...    # a stream, results in input order
        print(pool.explain(), pool.stats())
"""

from hxc.pool.pool import DeviceStats, Pool, PoolStats
from hxc.pool.worker import Backoff, Deadlines, Health, RequestFailed, Result, Worker, WorkerFailed, WorkerStats, run_isolated

__all__ = [
    "Backoff", "Deadlines", "DeviceStats", "Health", "Pool", "PoolStats", "RequestFailed", "Result", "Worker", "WorkerFailed",
    "WorkerStats", "run_isolated",
]  # fmt: skip
