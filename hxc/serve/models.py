"""The models a server holds: found from paths, named, loaded on every usable device.

A path is a bundle (a directory with a manifest, or anything `hxc.runtime.load`
accepts), or a directory of them; `NAME=PATH` names a model instead of its manifest.
Manifests are read (and names checked) before the server starts, so a mistake is a
one-line error; the devices are loaded afterwards, in the background, while the server
already answers liveness and reports the model not ready. In a directory of bundles,
one that cannot be read is skipped with a warning and the others are served (a bad
upload to a shared model directory must not take every model down); a bundle named
on the command line must be readable.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hxc.errors import HxcError, UsageError, first_line
from hxc.manifests.bundle import read_bundle, trust_policy
from hxc.manifests.schema import Manifest
from hxc.manifests.signing import TrustPolicy
from hxc.pool.policies import DEFAULT_POLICY
from hxc.runtime.prices import PriceTable

log = logging.getLogger("hxc.serve")
VERSION = "1"  # bundles carry no model version; every model serves as version 1
# A model name is one URL path segment as is: RFC 3986's unreserved characters, and
# not "." or ".." (which clients and proxies resolve away).
NAME = re.compile(r"[A-Za-z0-9._~-]{1,128}")


@dataclass(frozen=True)
class ServeOptions:
    """How `hxc serve` runs: the knobs of the CLI, in one record."""

    host: str = "127.0.0.1"
    port: int = 8000
    devices: str = "all"
    pin: str | dict[str, list[int]] | None = None
    policy: str = DEFAULT_POLICY  # a name in hxc.pool.policies.policy_names()
    slo_ms: float | None = None
    max_batch_size: int = 32
    max_queue_delay_ms: float = 0.0
    max_queue: int = 256
    max_body_bytes: int = 64 * 1024**2
    max_receiving_bytes: int = 256 * 1024**2  # held by all bodies still arriving, together
    body_timeout_s: float = 30.0  # from the end of a request's headers to the end of its body
    header_timeout_s: float = 10.0  # from a connection's first byte (or its last response) to a request's headers
    start_timeout_s: float = 180.0
    drain_timeout_s: float = 30.0
    prices: PriceTable | None = None  # for the cost policy; None: hxc's defaults and the user's file
    # SHA-256 digests of the API keys (never the keys); empty: no authentication.
    api_key_digests: tuple[bytes, ...] = field(default=(), repr=False)
    auth_health: bool = False  # the health probes need a key too
    open_metrics: bool = False  # /metrics needs no key
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_ca_certs: Path | None = None  # clients must present a certificate signed by one of these
    # What every bundle must prove (trusted keys, minimum sequence, signed profiles),
    # checked here and handed to every worker process; None: as $HXC_TRUSTED_KEYS says.
    trust: TrustPolicy | None = None
    # Language models: each device's KV cache budget (None: its whole cache), and the
    # streamed responses open at once, all models together (None: no cap).
    kv_cache_bytes: int | None = None
    max_streams: int | None = None
    slo_ttft_ms: float = 1000.0  # a request's targets unless it has its own: routed and counted (goodput) by them
    slo_tpot_ms: float = 200.0
    precisions: tuple[str, ...] = ()  # reduced-precision variants loaded beside each device's full-precision artifact


@dataclass
class ServedModel:
    name: str
    bundle: Path
    manifest: Manifest
    version: str = VERSION
    router: object | None = None  # hxc.pool.router.Router once loaded (an LMRouter for a language model)
    error: str | None = None  # why loading failed
    loaded: threading.Event = field(default_factory=threading.Event)
    tokenizer: object | None = None  # a language model's (hxc.runtime.generate.Tokenizer), read at load

    @property
    def signature(self):
        return self.manifest.signature

    @property
    def language_model(self):
        return self.manifest.language_model

    def ready(self) -> bool:
        return self.router is not None and self.router.ready()  # type: ignore[attr-defined]


def find_models(specs: Sequence[str], trust: TrustPolicy | None = None) -> list[ServedModel]:
    """Models for the command line's paths (bundles, directories of bundles, NAME=PATH),
    each checked against `trust` (None: as $HXC_TRUSTED_KEYS says)."""
    trust = trust if trust is not None else trust_policy()
    found: list[ServedModel] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = "", spec
        elif not name or "/" in name:
            name, path = "", spec  # a path with '=' in it
        p = Path(path)
        if not p.exists():
            raise UsageError(f"{path}: no such bundle or directory")
        scanned = p.is_dir() and not _is_bundle(p)
        bundles = sorted(c for c in p.iterdir() if _is_bundle(c)) if scanned else [p]
        if not bundles:
            raise UsageError(f"{path}: holds no bundle (a directory with manifest.json, or a .hxcb file)")
        if name and len(bundles) > 1:
            raise UsageError(f"{spec}: a name can only be given to one bundle, and {path} holds {len(bundles)}")
        readable = []
        for b in bundles:
            try:
                readable.append((b, read_bundle(b, trust).manifest))
            except (HxcError, OSError) as e:
                if not scanned:
                    raise
                log.warning("hxc serve: skipping %s: %s", b, first_line(e))
        if not readable:
            raise UsageError(f"{path}: none of its {len(bundles)} bundle(s) can be read (each is named above)")
        found.extend(ServedModel(name or manifest.model.name, b, manifest) for b, manifest in readable)
    names = [m.name for m in found]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"two bundles serve as model {dupes[0]!r}",
                         hint=f"name them: hxc serve {dupes[0]}-a=PATH {dupes[0]}-b=PATH")  # fmt: skip
    bad = [n for n in names if not NAME.fullmatch(n) or n in (".", "..")]
    if bad:
        raise UsageError(f"model name {bad[0][:130]!r} cannot be used in a URL path: a name is 1 to 128 letters, digits "
                         "and . _ ~ - (not . or ..)", hint="name it: hxc serve NAME=PATH")  # fmt: skip
    return found


def _is_bundle(p: Path) -> bool:
    from hxc.manifests.bundle import MANIFEST_FILE

    return (p.is_dir() and (p / MANIFEST_FILE).is_file()) or (p.is_file() and p.suffix == ".hxcb")


def load_model(model: ServedModel, options: ServeOptions, on_batch=None) -> None:
    """Start the model's device workers and its router (blocking: seconds per device)."""
    from hxc.pool.router import Router
    from hxc.pool.workers import Workers

    workers = None
    try:
        lm = model.language_model is not None
        workers = Workers(model.bundle, options.devices, pin=options.pin, start_timeout_s=options.start_timeout_s,
                          trust=options.trust, variants=options.precisions if lm else ())  # fmt: skip
        if model.language_model is not None:
            _load_language_model(model, workers, options)
            return
        model.router = Router(
            workers, policy=options.policy, slo_ms=options.slo_ms, max_batch_size=options.max_batch_size,
            max_queue_delay_ms=options.max_queue_delay_ms, max_queue=options.max_queue, prices=options.prices,
            on_batch=(lambda device, rows, n: on_batch(model.name, device, rows, n)) if on_batch else None,
        )  # fmt: skip
        states = ", ".join(f"{s.name} ({s.health})" for s in model.router.states())  # type: ignore[attr-defined]
        log.info("model %s: loaded on %s", model.name, states)
    except HxcError as e:
        if workers is not None and model.router is None:
            workers.close()
        model.error = first_line(e)
        log.error("model %s: %s", model.name, model.error)
    finally:
        model.loaded.set()


def _load_language_model(model: ServedModel, workers, options: ServeOptions) -> None:
    from hxc.pool.lm_router import LMRouter, Targets
    from hxc.runtime.generate import Tokenizer

    model.tokenizer = Tokenizer.of_bundle(model.bundle, workers.manifest)
    targets = Targets(options.slo_ttft_ms, options.slo_tpot_ms, options.slo_ms, options.policy)
    model.router = LMRouter(workers, kv_cache_bytes=options.kv_cache_bytes, max_queue=options.max_queue, targets=targets,
                            prices=options.prices)  # fmt: skip
    states = ", ".join(f"{s.name} ({s.health})" for s in model.router.states())
    log.info("model %s (a language model): loaded on %s", model.name, states)


def close_model(model: ServedModel) -> None:
    router = model.router
    if router is not None:
        router.close()  # type: ignore[attr-defined]
        router.workers.close()  # type: ignore[attr-defined]
