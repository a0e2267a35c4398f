"""The GPU check's steps that run on the GPU host's own Python.

gpu_check.py's remote half starts each as a child process with a timeout of its own:

    facts     the host: Python, glibc, CPU, GPUs (nvidia-smi), libcuda; standard library only
    versions  after the install: where hxc comes from, what is (not) installed, torch's CUDA
    torch     PyTorch on each device, from the bundle's program.pt2 and from the model's factory:
              outputs against the golden sample, then timed
    pool      `hxc run --devices GPU,CPU` on one batch split across both, against PyTorch
    serve     `hxc serve` on GPU + CPU: readiness, requests, metrics, SIGTERM

Each prints one JSON object on stdout and exits 0 when its proof held.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gpu_check import GPU_FAMILY, MODELS, execute, json_out, kill_group, tail


def loaded_from(names: Sequence[str]) -> dict[str, Any]:
    """Whether the dynamic loader finds each library name, and the file the first one found
    was loaded from (read back from /proc/self/maps)."""
    import ctypes

    found: dict[str, bool] = {}
    for name in names:
        try:
            ctypes.CDLL(name)
            found[name] = True
        except OSError:
            found[name] = False
    stem = "/" + names[0].split(".so")[0] + ".so"
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        maps = []
    return {"dlopen": found, "path": next((line.split()[-1] for line in maps if stem in line), None)}


def facts(args: argparse.Namespace) -> int:
    gpus = []
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap", "--format=csv,noheader"]
        gpus = execute(query, 15)[1].strip().splitlines()
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))  # fmt: skip
    except (OSError, StopIteration):
        pass
    print(json.dumps({"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
                      "glibc": platform.libc_ver()[1], "cpu": cpu, "cores": os.cpu_count(), "gpus": gpus,
                      # IREE's CUDA driver opens "libcuda.so" (no version): see gpu_check.cuda_shim
                      "libcuda": loaded_from(["libcuda.so.1", "libcuda.so"])}))  # fmt: skip
    return 0


def versions(args: argparse.Namespace) -> int:
    """What the install left: hxc from the wheel (not this tree), no compiler, torch's CUDA."""
    import importlib.metadata as md
    import importlib.util

    import hxc
    import iree.runtime  # noqa: F401 - the runtime must import, not just be listed

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    dists = ("hxc", "iree-base-runtime", "iree-base-compiler", "iree-turbine", "numpy", "ml-dtypes", "torch", "starlette",
             "uvicorn", "prometheus-client", "click", "rich", "cryptography")  # fmt: skip
    doc: dict[str, Any] = {"hxc_file": hxc.__file__, "versions": {d: version(d) for d in dists},
                           "absent": [m for m in ("iree.compiler", "iree.turbine") if importlib.util.find_spec(m) is None]}  # fmt: skip
    doc["from_wheel"] = not Path(hxc.__file__).resolve().is_relative_to(Path(args.tree).resolve())
    try:
        import torch

        doc["torch_cuda"] = torch.version.cuda
        doc["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as e:  # noqa: BLE001 - recorded; the steps that need torch say so themselves
        doc["torch_error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(doc))
    return 0 if doc["from_wheel"] and len(doc["absent"]) == 2 else 1


def _factory(manifest: Any) -> Callable[[], Any] | None:
    """The bundle's model rebuilt from its factory, for the check's own models only: a
    manifest's text never picks what code is imported."""
    import importlib

    source = manifest.model.source
    if manifest.model.source_format != "python" or source not in MODELS.values():
        return None
    module, _, name = source.partition(":")
    return lambda: getattr(importlib.import_module(module), name)()[0]


def torch_modules(bundle: Path, manifest: Any) -> list[tuple[str, Callable[[], Any]]]:
    """The ways to the model in this torch: the bundle's program.pt2 (saved by the compiling
    host's torch, which may be newer than this one), and the factory it was built from."""
    from hxc.bench.contenders import load_torch_module

    ways: list[tuple[str, Callable[[], Any]]] = [("program.pt2", lambda: load_torch_module(bundle, manifest))]
    if (make := _factory(manifest)) is not None:
        ways.append(("factory", make))
    return ways


def _flat(y: Any) -> list[Any]:
    if isinstance(y, (list, tuple)):
        return [t for item in y for t in _flat(item)]
    if isinstance(y, dict):
        return [t for item in y.values() for t in _flat(item)]
    return [y]


def rows(arrays: Sequence[Any], batch: int) -> list[Any]:
    """Inputs of `batch` rows: the golden sample's rows repeated along dimension 0."""
    import numpy as np

    return [np.ascontiguousarray(np.concatenate([a] * -(-batch // a.shape[0]))[:batch]) for a in arrays]


def _stats(seconds: list[float]) -> dict[str, float]:
    import numpy as np

    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "min_ms": float(ms.min()), "iterations": len(seconds)}  # fmt: skip


def torch_check(args: argparse.Namespace) -> int:
    """Outputs against the golden sample (PyTorch's at build time), then p50 at batch 1 and
    --batch: 10 warm-up calls, then at least 100 calls and --min-time seconds, each call
    synchronised, inputs and outputs left on the device, as hxc bench times artifacts."""
    import torch

    from hxc.errors import first_line
    from hxc.manifests import read_manifest
    from hxc.golden import compare
    from hxc.verify import load_golden

    bundle = Path(args.bundle)
    manifest = read_manifest(bundle)
    inputs, expected = load_golden(bundle, manifest)
    # hxc's artifacts compute in fp32; PyTorch's default for convolutions on NVIDIA GPUs is TF32.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dynamic = all(s.shape and isinstance(s.shape[0], str) for s in manifest.signature.inputs)
    batches = sorted({1, args.batch}) if dynamic else [inputs[0].shape[0]]
    doc: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "tf32": False, "threads": torch.get_num_threads(),
                           "sources": {}, "checks": [], "timings": [], "errors": []}  # fmt: skip
    deadline = time.monotonic() + args.max_total
    for source, make in torch_modules(bundle, manifest):
        try:
            module = make()
            doc["sources"][source] = {"ok": True}
        except Exception as e:  # noqa: BLE001 - torch raises many kinds for an archive from a newer torch
            doc["sources"][source] = {"ok": False, "error": f"{type(e).__name__}: {first_line(e)}"}
            continue
        for device in args.devices.split(","):
            try:
                m = module.to(device)
                sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
                with torch.inference_mode():
                    got = [t.cpu().numpy() for t in _flat(m(*[torch.from_numpy(a).to(device) for a in inputs]))]
                    results = [compare(g, e, s.dtype) for g, e, s in zip(got, expected, manifest.signature.outputs)]
                    doc["checks"].append({"source": source, "device": device, "ok": len(got) == len(expected) and all(r.ok for r in results),
                                          "max_abs": max(r.max_abs for r in results), "max_rel": max(r.max_rel for r in results)})  # fmt: skip
                    for batch in batches:
                        xs = [torch.from_numpy(a).to(device) for a in rows(inputs, batch)]
                        for _ in range(10):
                            m(*xs)
                        sync()
                        times: list[float] = []
                        start = time.perf_counter()
                        end = min(start + args.max_time, deadline)
                        while (len(times) < 100 or time.perf_counter() - start < args.min_time) and time.perf_counter() < end:
                            t = time.perf_counter()
                            m(*xs)
                            sync()
                            times.append(time.perf_counter() - t)
                        stats = _stats(times)
                        doc["timings"].append({"source": source, "device": device, "batch": batch, **stats,
                                               "items_per_second": batch * 1e3 / stats["mean_ms"]})  # fmt: skip
            except Exception as e:  # noqa: BLE001 - e.g. a program with a device baked in: recorded, the others go on
                doc["errors"].append({"source": source, "device": device, "error": f"{type(e).__name__}: {first_line(e)}"})
    print(json.dumps(doc, allow_nan=False))
    return 0 if doc["checks"] and all(c["ok"] for c in doc["checks"]) and doc["timings"] else 1


def _reference(bundle: Path, manifest: Any, inputs: list[Any]) -> tuple[str, list[Any]]:
    """PyTorch's outputs on `inputs`, on the CPU: from the bundle's program, else the factory."""
    import torch

    errors = []
    for source, make in torch_modules(bundle, manifest):
        try:
            with torch.inference_mode():
                return source, [t.numpy() for t in _flat(make()(*[torch.from_numpy(a) for a in inputs]))]
        except Exception as e:  # noqa: BLE001 - the next way may work
            errors.append(f"{source}: {type(e).__name__}: {e}")
    raise RuntimeError("no PyTorch reference: " + "; ".join(errors))


def pool_check(args: argparse.Namespace) -> int:
    import numpy as np

    from hxc.manifests import read_manifest
    from hxc.golden import compare
    from hxc.verify import load_golden

    bundle = Path(args.bundle)
    manifest = read_manifest(bundle)
    golden, _ = load_golden(bundle, manifest)
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((args.rows, *g.shape[1:])).astype(g.dtype) if g.dtype.kind == "f" else rows([g], args.rows)[0]
              for g in golden]  # fmt: skip
    doc: dict[str, Any] = {"rows": args.rows, "devices": args.devices}
    with tempfile.TemporaryDirectory(prefix="hxc-pool-") as tmp:
        work = Path(tmp)
        np.savez(work / "in.npz", **{s.name: a for s, a in zip(manifest.signature.inputs, inputs)})
        argv = [sys.executable, "-m", "hxc.cli", "run", bundle, "-i", work / "in.npz", "-o", work / "out.npz", "--devices",
                args.devices, "--json"]  # fmt: skip
        t0 = time.monotonic()
        rc, out, err = execute(argv, args.timeout, cwd=work)
        doc["seconds"], doc["rc"] = round(time.monotonic() - t0, 2), rc
        ran = json_out(out) if rc is not None else None
        doc["hxc_run"] = {k: v for k, v in ran.items() if k != "outputs"} if isinstance(ran, dict) else {"stderr": tail(err)}
        if rc == 0:
            with np.load(work / "out.npz") as f:
                got = [f[f"output_{i}"] for i in range(len(f.files))]
            source, want = _reference(bundle, manifest, inputs)
            results = [compare(g, w, s.dtype) for g, w, s in zip(got, want, manifest.signature.outputs)]
            doc["reference"] = f"torch on the CPU, {source}"
            doc["compare"] = {"ok": len(got) == len(want) and all(r.ok for r in results), "max_abs": max(r.max_abs for r in results),
                              "max_rel": max(r.max_rel for r in results)}  # fmt: skip
    telemetry = (doc["hxc_run"].get("telemetry") or {}) if isinstance(doc["hxc_run"], dict) else {}
    used = [d for d in telemetry.get("devices") or [] if isinstance(d, dict)]
    # Which devices take rows is the pool's own judgement (a slow one may be left out); a
    # device that fails is not.
    doc["verdict"] = {"ok": rc == 0 and bool(doc.get("compare", {}).get("ok")) and not any(d.get("failures") for d in used),
                      "matches_torch": doc.get("compare", {}).get("ok"), "wall_s": telemetry.get("wall_s"),
                      "rows": {d.get("name"): d.get("items") for d in used},
                      "left_out": {d.get("name"): d["left_out"] for d in used if d.get("left_out")}}  # fmt: skip
    print(json.dumps(doc, allow_nan=False))
    return 0 if doc["verdict"]["ok"] else 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, Any, float]:
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"} if data else {})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status = r.read(), r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    ms = (time.perf_counter() - t0) * 1e3
    text = raw.decode("utf-8", "replace")
    try:
        return status, json.loads(text), ms
    except ValueError:
        return status, text, ms


def _requests(base: str, bundles: Sequence[str], gpu: str, deadline: float) -> list[dict[str, Any]]:
    """Per model, its golden sample sent to the GPU (the `device` request parameter) and
    then routed by the server; each answer against the golden outputs."""
    import numpy as np

    from hxc.dtypes import dtype
    from hxc.manifests import read_manifest
    from hxc.golden import compare
    from hxc.verify import load_golden

    done = []
    for b in bundles:
        manifest = read_manifest(Path(b))
        inputs, expected = load_golden(Path(b), manifest)
        body = {"id": manifest.model.name, "inputs": [
            {"name": s.name, "datatype": dtype(s.dtype).kserve, "shape": list(a.shape), "data": a.ravel().tolist()}
            for s, a in zip(manifest.signature.inputs, inputs)]}  # fmt: skip
        for how, params in (("gpu", {"parameters": {"device": gpu}}), ("routed", {})):
            status, reply, ms = _http("POST", f"{base}/v2/models/{manifest.model.name}/infer", body | params,
                                      timeout=max(deadline - time.monotonic(), 1))  # fmt: skip
            entry: dict[str, Any] = {"model": manifest.model.name, "sent_to": how, "status": status, "ms": round(ms, 2)}
            if status == 200 and isinstance(reply, dict):
                entry["parameters"] = reply.get("parameters")
                got = {o["name"]: np.asarray(o["data"], dtype=dtype(s.dtype).numpy_dtype()).reshape(o["shape"])
                       for o, s in zip(reply["outputs"], manifest.signature.outputs)}  # fmt: skip
                results = [compare(got[s.name], e, s.dtype) for s, e in zip(manifest.signature.outputs, expected)]
                entry["matches_golden"] = all(r.ok for r in results)
                entry["max_abs"] = max(r.max_abs for r in results)
            else:
                entry["error"] = reply if isinstance(reply, (dict, str)) else repr(reply)
            done.append(entry)
    return done


def serve_check(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout
    # Kept for the server to drain and stop; a short timeout keeps a third of itself for that.
    stop_s = min(args.stop_s, args.timeout / 3)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "hxc.cli", "serve", *args.bundles, "--devices", args.devices, "--port", str(port), "--json"]
    doc: dict[str, Any] = {"command": argv[1:], "requests": []}
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            t0 = time.monotonic()
            while time.monotonic() < deadline - stop_s and proc.poll() is None:
                try:
                    if _http("GET", f"{base}/v2/health/ready", timeout=2)[0] == 200:
                        doc["ready_s"] = round(time.monotonic() - t0, 2)
                        break
                except OSError:  # not listening yet
                    pass
                time.sleep(0.3)
            if "ready_s" in doc:
                doc["requests"] = _requests(base, args.bundles, args.gpu, deadline - stop_s)
                metrics = str(_http("GET", f"{base}/metrics", timeout=10)[1])
                doc["metrics"] = [line for line in metrics.splitlines() if line.startswith("hxc_inference_requests_total")]
        except OSError as e:
            doc["error"] = f"{type(e).__name__}: {e}"
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # drains the requests in flight, stops the workers, exits 0
                try:
                    proc.wait(timeout=max(deadline - time.monotonic(), 5))
                except subprocess.TimeoutExpired:
                    doc["stop"] = "still running after SIGTERM: killed"
            kill_group(proc.pid)
            proc.wait()
            doc["exit_code"] = proc.returncode
            log.seek(0)
            text = log.read()
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    doc["events"] = [e.get("event") for e in events]
    if "ready_s" not in doc or doc["exit_code"] != 0:
        doc["log"] = tail(text, 2000)
    family = GPU_FAMILY.get(args.gpu, args.gpu)
    on_gpu = [r for r in doc["requests"] if r["sent_to"] == "gpu"]
    doc["verdict"] = {
        "ok": bool(doc["requests"]) and all(r["status"] == 200 and r.get("matches_golden") for r in doc["requests"])
        and all(str((r.get("parameters") or {}).get("device", "")).startswith(family) for r in on_gpu) and doc["exit_code"] == 0,
        "ready_s": doc.get("ready_s"), "exit_code": doc["exit_code"],
        "ran_on": {f"{r['model']}/{r['sent_to']}": (r.get("parameters") or {}).get("device") for r in doc["requests"]},
    }  # fmt: skip
    print(json.dumps(doc, allow_nan=False))
    return 0 if doc["verdict"]["ok"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("facts")
    p = sub.add_parser("versions")
    p.add_argument("--tree", required=True, help="the source tree hxc must not be imported from")
    p = sub.add_parser("torch")
    p.add_argument("--bundle", required=True)
    p.add_argument("--devices", default="cuda,cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--min-time", type=float, default=0.5)
    p.add_argument("--max-time", type=float, default=10.0, help="per device and batch")
    p.add_argument("--max-total", type=float, default=60.0, help="for all timings together")
    p = sub.add_parser("pool")
    p.add_argument("--bundle", required=True)
    p.add_argument("--devices", required=True)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--timeout", type=float, default=80)
    p = sub.add_parser("serve")
    p.add_argument("bundles", nargs="+")
    p.add_argument("--devices", required=True)
    p.add_argument("--gpu", required=True, help="the device selector requests are sent to")
    p.add_argument("--timeout", type=float, default=100)
    p.add_argument("--stop-s", type=float, default=15, help="of --timeout, kept for the server to stop (a third at most)")
    args = ap.parse_args(argv)
    run = {"facts": facts, "versions": versions, "torch": torch_check, "pool": pool_check, "serve": serve_check}
    return run[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
