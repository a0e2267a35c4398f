"""`hxc serve`: bundles behind the KServe v2 / Open Inference Protocol (HTTP/REST), every
request routed across the device pool by deadline and cost.

    models.py    bundles found, named and loaded (hxc.pool.workers' processes + a Router each)
    protocol.py  inference requests and responses: JSON tensors and binary tensor data
    app.py       the REST routes on Starlette; errors as {"error": ...} with their statuses
    guard.py     before any route: API keys, and bodies read in full, bounded in size, time and memory
    metrics.py   Prometheus metrics
    server.py    uvicorn, TLS, the header timeout, readiness, SIGTERM drains in-flight requests

Language models, beside the tensor routes:

    openai.py        the OpenAI API's messages (/v1/completions, /v1/chat/completions, /v1/models)
    generate_ext.py  the KServe / Triton generate extension's messages
    lm.py            one request's generation: tokenise, queue on the devices, tokens to text
    lm_routes.py     their routes: server-sent events, errors in each API's shape, disconnects

Routing, dynamic batching, bounded queues and failover live one layer down, in
`hxc.pool.router`, on the bundle's worker processes (`hxc.pool.workers`); the routing
policies are the modules of `hxc.pool.policies`. A language model's sequences are
batched continuously in its worker processes and routed by `hxc.pool.lm_router`.
"""
