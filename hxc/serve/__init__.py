"""`hxc serve`: bundles behind the KServe v2 / Open Inference Protocol (HTTP/REST), every
request routed across the device pool by deadline and cost.

    models.py    bundles found, named and loaded (hxc.pool.workers' processes + a Router each)
    protocol.py  inference requests and responses: JSON tensors and binary tensor data
    app.py       the REST routes on Starlette; errors as {"error": ...} with their statuses
    guard.py     before any route: API keys, and bodies read in full, bounded in size, time and memory
    metrics.py   Prometheus metrics
    server.py    uvicorn, TLS, the header timeout, readiness, SIGTERM drains in-flight requests

Routing, dynamic batching, bounded queues and failover live one layer down, in
`hxc.pool.router`, on the bundle's worker processes (`hxc.pool.workers`); the routing
policies are the modules of `hxc.pool.policies`.
"""
