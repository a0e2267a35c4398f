"""A GPU proof for a host with an NVIDIA GPU and PyTorch but no network and no IREE.

The driver behind benchmarks/gpu_check.sh (README, "GPU check"):

    gpu_check.sh local     here (network, hxc[compile]): a wheel of this checkout and every
                           wheel its runtime-only install with `serve` needs, for the GPU
                           host's Python, plus the example CNN and a small transformer
                           compiled for cuda:sm_90 and cpu:x86-64-v3, into .gpu_check/
                           (ignored by git), checked to travel in under 64 MiB with the tree
    gpu_check.sh remote    there, one command: pip install --no-index those wheels, then
                           hxc doctor / select --explain / verify / bench, PyTorch on the
                           GPU from the same model, a pool over GPU + CPU and `hxc serve`
                           with requests; every step under its own timeout, the whole
                           under --budget seconds, $OUT/gpu_check.json and
                           $OUT/gpu_check.log written after every step, failures recorded
                           and the next step run
    gpu_check.sh dry-run   both halves on this machine: wheels for this Python, the GPU
                           played by Vulkan (lavapipe), PyTorch on the CPU, and the remote
                           half in a fresh virtualenv that sees PyTorch but no IREE and no
                           hxc until the wheels are installed, as on the GPU host

The remote half here uses the standard library only, so it records a failed install
too; what needs hxc, numpy or torch is in gpu_check_steps.py, run on the host's Python
as child processes, each with a timeout of its own.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve()
STEPS = HERE.with_name("gpu_check_steps.py")
MIB = 2**20
SCHEMA = "hxc-gpu-check/1"
# The models proven: name in the bundle folder -> factory (`hxc compile` takes it; the
# PyTorch check rebuilds it from the same factory on the GPU host's own torch).
MODELS = {"convnet": "hxc.examples:convnet", "transformer": "hxc.examples.zoo:torch_transformer"}
GPU_TARGET = "cuda:sm_90"
# What a request served on a device driver reports as its `device` (an artifact id).
GPU_FAMILY = {"cuda": "cuda:", "vulkan": "vulkan:", "hip": "rocm:"}
# The GPU host's CPU is not known ahead: x86-64-v3 (AVX2, FMA) runs on every x86 server
# CPU since 2013-2015.
CPU_TARGET = "cpu:x86-64-v3"
# The GPU host's Python (KINDS.md: 3.12.3) and a glibc no newer than its (Ubuntu 24.04: 2.39);
# manylinux_2_28 is what the item names and what torch's own wheels need.
PYTHON_VERSION = "3.12"
GLIBC = "2.28"
TRAVEL_LIMIT = 64 * MIB  # the device tool's limit on the working tree plus carried paths
BUDGET_S = 270.0  # the remote half, all steps; the device call gets timeout_s=300
NOT_SOURCE = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", "*.hxc",
              ".gpu_check*", ".whl", ".gl")  # fmt: skip


class CheckError(Exception):
    """A precondition of the local half failed: one line, exit 1."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, doc: Any) -> None:
    """Replace `path` whole (a reader, or a lease that ends mid-write, sees the old or the new)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str, allow_nan=False) + "\n")
    os.replace(tmp, path)


def tail(text: str, n: int = 1500) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def execute(argv: Sequence[str | Path], timeout: float, *, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> tuple[int | None, str, str]:  # fmt: skip
    """Run argv in a process group of its own; after `timeout` seconds kill the whole group
    (hxc's device workers too) and return rc None with what it had printed. Whatever the
    command left running in its group is killed when it returns, so no step outlives its slot."""
    p = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                         text=True, errors="replace", env=env, cwd=cwd, start_new_session=True)  # fmt: skip
    try:
        out, err = p.communicate(timeout=max(timeout, 0.1))
        return p.returncode, out, err
    except subprocess.TimeoutExpired:
        kill_group(p.pid)
        try:
            out, err = p.communicate(timeout=15)
        except subprocess.TimeoutExpired:  # a grandchild in another group holds the pipes
            p.kill()
            out, err = "", "(output lost: the pipes stayed open after the kill)"
        return None, out, err
    finally:
        kill_group(p.pid)


# --------------------------------------------------------------------------------------
# Here: the local half


def travelling_bytes(repo: Path) -> int:
    """What the device tool sends besides carried paths: tracked and untracked-not-ignored
    files (their sizes, as `git ls-files | xargs du -cb` counts them)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                            capture_output=True, check=True, timeout=60).stdout  # fmt: skip
    total = 0
    for name in set(listed.decode().split("\0")) - {""}:
        try:
            total += os.lstat(repo / name).st_size
        except FileNotFoundError:  # deleted in the work tree, still in the index
            pass
    return total


def folder_bytes(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() or p.is_symlink())


def manylinux_tags(glibc: str) -> list[str]:
    """Every manylinux tag a glibc of this version runs: pip download matches tags exactly."""
    major, minor = (int(x) for x in glibc.split("."))
    return [f"manylinux_{major}_{m}_x86_64" for m in range(minor, 4, -1)] + [
        "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]  # fmt: skip


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _checked(argv: Sequence[str | Path], what: str, timeout: float, env: dict[str, str] | None = None) -> str:
    rc, out, err = execute(argv, timeout, env=env)
    if rc != 0:
        why = "timed out" if rc is None else f"exit {rc}"
        raise CheckError(f"{what} failed ({why}): {tail((err or out).strip(), 800)}")
    return out


def local(args: argparse.Namespace) -> int:
    """Build the folder the remote half needs: wheels and bundles, and their record."""
    dest = (REPO / args.dir).resolve()
    py = sys.executable
    # This checkout's hxc compiles, whatever else the interpreter has installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    missing = subprocess.run([py, "-c", "import importlib.util as u\n"
                              "print(', '.join(m for m in ('torch', 'iree.compiler', 'iree.turbine') if not u.find_spec(m)))"],
                             capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    if missing.returncode != 0 or missing.stdout.strip():
        raise CheckError(f"the local half compiles models and needs {missing.stdout.strip() or missing.stderr.strip()}, which {py} lacks "
                         f"(pip install -e '.[compile]', or make setup)")  # fmt: skip
    tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        wheels, bundles = tmp / "wheels", tmp / "bundles"
        bundles.mkdir(parents=True)
        # A wheel of this checkout, built from a copy: setuptools keeps whatever a stale build/ holds.
        src = Path(shutil.copytree(REPO, tmp / "src", ignore=shutil.ignore_patterns(*NOT_SOURCE)))
        print("building the hxc wheel…", file=sys.stderr, flush=True)
        _checked([py, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps", "--no-build-isolation",
                  "-w", wheels, src], "pip wheel", 600, env)  # fmt: skip
        shutil.rmtree(src)
        [hxc_wheel] = wheels.glob("hxc-*.whl")
        tags = manylinux_tags(args.glibc)
        print(f"downloading the runtime-only install's wheels for CPython {args.python_version}…", file=sys.stderr, flush=True)
        # pip resolves hxc[serve]'s requirements (pyproject's, through the wheel's metadata) for
        # that Python and platform: the closure of what a runtime-only install needs.
        _checked([py, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--only-binary=:all:",
                  "--python-version", args.python_version, "--implementation", "cp",
                  *[a for t in tags for a in ("--platform", t)], "-d", wheels, f"{hxc_wheel}[serve]"],
                 "pip download", 900)  # fmt: skip
        # Offline, as on the GPU host: the folder alone must satisfy the whole install (a fresh
        # Python's view: --target installs ignore what the interpreter here has).
        would = _checked([py, "-m", "pip", "install", "--dry-run", "--disable-pip-version-check", "--ignore-requires-python",
                          "--no-index", "--find-links", wheels, "--only-binary=:all:", "--python-version", args.python_version,
                          "--implementation", "cp", *[a for t in tags for a in ("--platform", t)], "--target", tmp / "resolve",
                          f"{hxc_wheel}[serve]"], "resolving the install offline from the downloaded wheels", 300)  # fmt: skip
        heavy = [w.name for w in wheels.iterdir() if w.name.split("-")[0].lower().replace("_", "-")
                 in ("torch", "iree-base-compiler", "iree-turbine", "onnx", "onnxruntime")]  # fmt: skip
        if heavy:
            raise CheckError(f"the runtime-only install would pull {', '.join(heavy)}")
        built = []
        for name, factory in MODELS.items():
            print(f"compiling {factory} for {args.gpu_target}, {args.cpu_target}…", file=sys.stderr, flush=True)
            out = bundles / f"{name}.hxc"
            report = json.loads(_checked([py, "-m", "hxc.cli", "compile", factory, "-t", f"{args.gpu_target},{args.cpu_target}",
                                          "--dynamic-batch", "-o", out, "--json"], f"hxc compile {factory}", 1800, env))  # fmt: skip
            manifest = json.loads((out / "manifest.json").read_text())
            built.append({"name": name, "model": factory, "bytes": folder_bytes(out),
                          "artifacts": {a["id"]: {"status": a["status"], "bytes": a["size"], "verified": a["verified"]}
                                        for a in manifest["artifacts"]},
                          "toolchain": manifest.get("toolchain"), "compile": {k: report.get(k) for k in ("ok", "exit_code")}})  # fmt: skip
        record: dict[str, Any] = {
            "schema": SCHEMA, "created": _now(), "git": _git(), "python_version": args.python_version,
            "glibc": args.glibc, "gpu_target": args.gpu_target, "cpu_target": args.cpu_target,
            "wheels": [{"file": w.name, "bytes": w.stat().st_size, "sha256": _sha256(w)} for w in sorted(wheels.iterdir())],
            "bundles": built, "would_install": (re.findall(r"Would install (.+)", would) or [""])[-1].split(),
        }  # fmt: skip
        tree, folder = travelling_bytes(REPO), folder_bytes(tmp) + 4096  # room for this record
        record["sizes"] = {"tree_bytes": tree, "folder_bytes": folder, "total_bytes": tree + folder, "limit_bytes": args.limit_mib * MIB,
                           "wheels_bytes": sum(w["bytes"] for w in record["wheels"]),
                           "bundles_bytes": sum(b["bytes"] for b in built)}  # fmt: skip
        if tree + folder > args.limit_mib * MIB:
            raise CheckError(f"the tree ({tree / MIB:.1f} MiB) and {dest.name}/ ({folder / MIB:.1f} MiB) come to "
                             f"{(tree + folder) / MIB:.1f} MiB, over the {args.limit_mib} MiB a device call carries")  # fmt: skip
        _write_json(tmp / "local.json", record)
        old = dest.with_name(f"{dest.name}.old{os.getpid()}")
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    s = record["sizes"]
    print(f"wrote {dest}: {len(record['wheels'])} wheels ({s['wheels_bytes'] / MIB:.1f} MiB), {len(built)} bundles "
          f"({s['bundles_bytes'] / MIB:.2f} MiB); with the tree ({s['tree_bytes'] / MIB:.1f} MiB) "
          f"{s['total_bytes'] / MIB:.1f} MiB of {args.limit_mib} MiB")  # fmt: skip
    return 0


def _git() -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                                    text=True, timeout=30).stdout.strip())  # fmt: skip
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": str(e)}


# --------------------------------------------------------------------------------------
# There: the remote half


@dataclass
class Step:
    name: str
    status: str = "skipped"  # ok | failed | timeout | skipped
    seconds: float = 0.0
    timeout_s: float | None = None
    command: list[str] | None = None
    rc: int | None = None
    error: str | None = None
    result: Any = None


@dataclass
class Check:
    """Runs the remote half's steps, each under a timeout that leaves the steps after it
    their minimum, and writes everything after every step."""

    out: Path
    budget: float
    plan: dict[str, tuple[float, float]]  # steps not run yet, in order: (cap, floor) seconds
    doc: dict[str, Any]
    started: float = field(default_factory=time.monotonic)
    steps: list[Step] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = (self.out / "gpu_check.log").open("a", encoding="utf-8", errors="replace")
        self.doc.update(schema=SCHEMA, status="running", started=_now(), budget_s=self.budget, steps=[])
        self.save()

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.started)

    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.started:6.1f}s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def save(self, status: str | None = None) -> None:
        if status:
            self.doc["status"] = status
        self.doc["steps"] = [asdict(s) for s in self.steps]
        self.doc["seconds"] = round(time.monotonic() - self.started, 1)
        self.doc["ok"] = bool(self.steps) and all(s.status == "ok" for s in self.steps)
        _write_json(self.out / "gpu_check.json", self.doc)

    def _slot(self, name: str) -> tuple[float, str | None]:
        """The step's timeout: its cap, or what is left after every later step's floor."""
        cap, floor = self.plan.pop(name)
        later = sum(f for _, f in self.plan.values())
        slot = min(cap, self.left() - later)
        if slot < floor:
            return slot, f"not enough time left: {max(self.left(), 0):.0f} s, of which {later:.0f} s are kept for later steps"
        return slot, None

    def skip(self, name: str, reason: str) -> Step:
        self.plan.pop(name, None)
        return self._record(Step(name, error=reason))

    def run(self, name: str, argv: Sequence[str | Path] | Callable[[float], Sequence[str | Path]], *, env: dict[str, str],
            cwd: Path, parse: Callable[[int | None, str, str], tuple[bool, Any]] | None = None) -> Step:  # fmt: skip
        """Run one step. `argv` may be a function of the step's timeout (for steps that
        pace themselves); `parse(rc, stdout, stderr)` says whether it passed and what to keep:
        by default it passed when it exited 0, and stdout is kept when it is JSON."""
        slot, reason = self._slot(name)
        argv = argv(slot) if callable(argv) else argv
        step = Step(name, command=[str(a) for a in argv], timeout_s=round(slot, 1))
        if reason:
            step.error = reason
            return self._record(step)
        shown = " ".join(f"'<{a.count(chr(10)) + 1}-line script>'" if "\n" in a else a for a in step.command)
        self.say(f"{name}: {shown}  (timeout {slot:.0f} s)")
        t0 = time.monotonic()
        try:
            rc, out, err = execute(argv, slot, env=env, cwd=cwd)
        except OSError as e:  # the program is missing
            rc, out, err = 127, "", str(e)
        step.seconds = round(time.monotonic() - t0, 2)
        step.rc = rc
        self.log.write(f"--- {name} stdout\n{out}\n--- {name} stderr\n{err}\n")
        try:
            passed, step.result = (parse or _default_parse)(rc, out, err)
        except Exception as e:  # noqa: BLE001 - a parser that breaks on odd output is that step's failure, not the run's
            passed, step.result = False, {"stdout": tail(out)}
            step.error = f"could not read the output: {type(e).__name__}: {e}"
        if rc is None:
            step.status, step.error = "timeout", f"timed out after {slot:.0f} s; {tail(err.strip(), 600)}"
        elif passed:
            step.status = "ok"
        else:
            step.status = "failed"
            step.error = step.error or f"exit {rc}: {tail((err or out).strip(), 1200)}"
        return self._record(step)

    def _record(self, step: Step) -> Step:
        self.steps.append(step)
        self.say(f"{step.name}: {step.status.upper()}" + (f" in {step.seconds:.1f} s" if step.command else "")
                 + (f" - {step.error.splitlines()[0][:300]}" if step.error and step.status != "ok" else ""))  # fmt: skip
        self.save()
        return step


def json_out(out: str) -> Any:
    return json.loads(out) if out.strip().startswith(("{", "[")) else None


def _default_parse(rc: int | None, out: str, err: str) -> tuple[bool, Any]:
    return rc == 0, json_out(out) if rc is not None else None


@dataclass(frozen=True)
class Host:
    """Where the remote half's steps run: the host's Python, with `env` (which the install
    may have to point at a prefix), in a work folder outside the tree."""

    python: str
    env: dict[str, str]
    work: Path

    def hxc(self, *args: str | Path) -> list[str | Path]:
        return [self.python, "-m", "hxc.cli", *args]

    def step(self, *args: str | Path) -> list[str | Path]:
        """A step of gpu_check_steps.py, on the host's Python."""
        return [self.python, STEPS, *args]


def _child_env(prefix: Path | None = None) -> dict[str, str]:
    """The environment steps run in: the repository's own copy of hxc is kept off the path,
    so what runs is the installed wheel (and they run in a work folder, not the repo)."""
    env = dict(os.environ)
    keep = [p for p in env.pop("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]
    if prefix is not None:
        keep[:0] = [str(p) for p in prefix.glob("lib/python3*/site-packages")]
        env["PATH"] = f"{prefix / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    if keep:
        env["PYTHONPATH"] = os.pathsep.join(keep)
    env["PYTHONUNBUFFERED"] = "1"
    env["PIP_ROOT_USER_ACTION"] = "ignore"
    return env


# step: (cap s, floor s), in the order they run. The caps fit an H100 host with room to
# spare; the floors are what each later step keeps back from the ones before it.
REMOTE_PLAN: dict[str, tuple[float, float]] = {
    "host": (20, 3), "install": (150, 20), "versions": (60, 5), "doctor": (60, 5),
    **{f"select:{m}": (30, 3) for m in MODELS}, **{f"verify:{m}": (120, 10) for m in MODELS},
    **{f"torch:{m}": (90, 10) for m in MODELS}, **{f"bench:{m}": (150, 20) for m in MODELS},
    "pool": (90, 20), "serve": (120, 30),
}  # fmt: skip


def remote(args: argparse.Namespace) -> int:
    """The GPU host's half: every step recorded, whatever fails."""
    folder = (REPO / args.dir).resolve()
    out = Path(args.out or os.environ.get("OUT") or folder / "out").resolve()
    config = {"gpu": args.gpu, "cpu": args.cpu, "torch_devices": args.torch_devices, "python": args.python,
              "folder": str(folder), "scale": args.scale, "min_time": args.min_time}  # fmt: skip
    doc: dict[str, Any] = {"config": config}
    try:
        doc["local"] = json.loads((folder / "local.json").read_text())
    except (OSError, ValueError) as e:
        doc["local"] = {"error": f"{folder / 'local.json'}: {e}"}
    plan = {name: (cap * args.scale, floor) for name, (cap, floor) in REMOTE_PLAN.items()}
    check = Check(out, args.budget, plan, doc)
    # A stop from outside (the lease's end) still leaves a record that says so.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="hxc-gpu-check-"))
    try:
        _remote_steps(check, Host(args.python, _child_env(), work), folder, args)
        check.doc["summary"] = summarize(check.steps, args.gpu)
        check.save("complete")
    except BaseException as e:
        check.doc["interrupted"] = f"{type(e).__name__}: {e}"
        check.save("interrupted")
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for line in summary_lines(check.doc):
        check.say(line)
    check.say(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.log'}")
    return 0 if check.doc["ok"] else 1


def _remote_steps(check: Check, host: Host, folder: Path, args: argparse.Namespace) -> None:
    wheels, env, work = folder / "wheels", host.env, host.work
    bundles = {}
    for m in MODELS:  # private copies: bench records profiles into them, and the carried tree stays as it came
        if (folder / "bundles" / f"{m}.hxc").is_dir():
            bundles[m] = Path(shutil.copytree(folder / "bundles" / f"{m}.hxc", work / f"{m}.hxc"))
    facts = check.run("host", host.step("facts"), env=env, cwd=work)
    if isinstance(facts.result, dict) and (shim := cuda_shim(facts.result.get("libcuda") or {}, work, env)):
        check.doc["cuda_shim"] = shim
        check.say(f"libcuda.so is not on the loader's path: IREE's CUDA driver gets {shim}")

    hxc_wheels = sorted(wheels.glob("hxc-*.whl"))
    if not hxc_wheels:
        check.skip("install", f"no hxc wheel in {wheels}: run `benchmarks/gpu_check.sh local` first and carry {folder.name}")
    else:
        _install(check, host, wheels, hxc_wheels[-1])
    versions = check.run("versions", host.step("versions", "--tree", REPO), env=env, cwd=work)
    if not isinstance(versions.result, dict):  # hxc does not import: nothing after this can run
        for name in list(check.plan):
            check.skip(name, "hxc does not import on the host's Python (see the install and versions steps)")
        return

    def doctor(rc: int | None, out: str, err: str) -> tuple[bool, Any]:
        doc = json_out(out)
        drivers = [{k: d.get(k) for k in ("name", "available", "reason")} | {"devices": [
            {k: x.get(k) for k in ("name", "kind", "arch", "driver_version")} for x in d.get("devices") or []]}
            for d in doc.get("drivers", [])]  # fmt: skip
        gpu_ok = any(d["name"] == args.gpu and d["available"] and d["devices"] for d in drivers)
        return rc == 0 and gpu_ok, {"drivers": drivers, "versions": doc.get("versions"), "cpu": doc.get("cpu"),
                                    "ptxas": doc.get("ptxas"), "gpu_driver_ok": gpu_ok}  # fmt: skip

    check.run("doctor", host.hxc("doctor", "--json"), env=env, cwd=work, parse=doctor)
    for m in MODELS:
        if m not in bundles:
            for step in ("select", "verify", "torch", "bench"):
                check.skip(f"{step}:{m}", f"no bundle {m}.hxc in {folder / 'bundles'}")
    for m, b in bundles.items():
        check.run(f"select:{m}", host.hxc("select", b, "--explain", "--json"), env=env, cwd=work, parse=_select_parse(args.gpu))
    for m, b in bundles.items():
        check.run(f"verify:{m}", host.hxc("verify", b, "--json"), env=env, cwd=work, parse=_verify_parse(args.gpu))
    for m, b in bundles.items():
        check.run(f"torch:{m}", lambda slot, b=b: host.step("torch", "--bundle", b, "--devices", args.torch_devices, "--batch", "32",
                                                            "--min-time", str(args.min_time), "--max-total", f"{slot * 0.6:.0f}"),
                  env=env, cwd=work)  # fmt: skip
    for m, b in bundles.items():
        check.run(f"bench:{m}", host.hxc("bench", b, "--json", "--batch", "32", "--min-time", str(args.min_time),
                                         "--max-time", str(10 * args.scale)), env=env, cwd=work, parse=_bench_parse)  # fmt: skip
    devices = f"{args.gpu},{args.cpu}"
    if "convnet" in bundles:
        check.run("pool", lambda slot: host.step("pool", "--bundle", bundles["convnet"], "--devices", devices, "--rows", "256",
                                                 "--timeout", f"{slot * 0.7:.0f}"), env=env, cwd=work)  # fmt: skip
    else:
        check.skip("pool", "no convnet bundle")
    if bundles:
        check.run("serve", lambda slot: host.step("serve", *bundles.values(), "--devices", devices, "--gpu", args.gpu,
                                                  "--timeout", f"{slot - 5:.0f}"), env=env, cwd=work)  # fmt: skip
    else:
        check.skip("serve", "no bundles")


def cuda_shim(libcuda: dict[str, Any], work: Path, env: dict[str, str]) -> str | None:
    """IREE's CUDA driver dlopens "libcuda.so", the unversioned name that only the driver's
    development files provide; a host (or container) with just the runtime's libcuda.so.1
    then reports no CUDA at all. Where the loader finds libcuda.so.1 but not libcuda.so,
    give the steps a folder holding libcuda.so -> that file, on LD_LIBRARY_PATH."""
    if libcuda.get("dlopen", {}).get("libcuda.so") or not libcuda.get("path"):
        return None
    shim = work / "libcuda-shim"
    shim.mkdir(exist_ok=True)
    (shim / "libcuda.so").symlink_to(libcuda["path"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(shim), env.get("LD_LIBRARY_PATH")]))
    return f"{shim / 'libcuda.so'} -> {libcuda['path']}"


def _install(check: Check, host: Host, wheels: Path, hxc_wheel: Path) -> None:
    """pip install --no-index hxc[serve] from the carried wheels into the host's Python:
    what is there already and satisfies a requirement (numpy, click, ...) stays. Where that
    environment cannot be written, into a prefix put on the children's path instead."""
    listing = [host.python, "-m", "pip", "list", "--format=json", "--disable-pip-version-check"]
    before = execute(listing, 60, env=host.env, cwd=host.work)
    base = [host.python, "-m", "pip", "install", "--no-index", "--find-links", wheels, "--no-cache-dir",
            "--disable-pip-version-check", "--no-input", "--no-compile"]  # fmt: skip

    def installed(rc: int | None, out: str, err: str) -> tuple[bool, Any]:
        done = re.findall(r"Successfully installed (.+)", out)
        return rc == 0, {"installed": done[-1].split() if done else [], "stdout": tail(out, 600)}

    step = check.run("install", [*base, f"{hxc_wheel}[serve]"], env=host.env, cwd=host.work, parse=installed)
    if step.status == "failed" and re.search(r"Permission denied|Read-only file system|Errno 13|Errno 30", step.error or ""):
        prefix = host.work / "prefix"
        check.plan["install-prefix"] = (REMOTE_PLAN["install"][0], 5)
        retry = check.run("install-prefix", [*base, "--prefix", prefix, f"{hxc_wheel}[serve]"], env=host.env, cwd=host.work,
                          parse=installed)  # fmt: skip
        if retry.status == "ok":
            host.env.clear()
            host.env.update(_child_env(prefix))
    after = execute(listing, 60, env=host.env, cwd=host.work)
    try:
        old = {p["name"].lower(): p["version"] for p in json.loads(before[1])}
        new = {p["name"].lower(): p["version"] for p in json.loads(after[1])}
    except (ValueError, TypeError, KeyError):  # no pip list: the install step's own output says why
        return
    step.result = (step.result or {}) | {"added": {k: v for k, v in new.items() if k not in old},
                                         "changed": {k: [old[k], v] for k, v in new.items() if k in old and old[k] != v}}  # fmt: skip
    check.save()


def _select_parse(gpu: str) -> Callable[[int | None, str, str], tuple[bool, Any]]:
    def parse(rc: int | None, out: str, err: str) -> tuple[bool, Any]:
        doc = json_out(out)
        choice = doc.get("choice") or {}
        return rc == 0, {"choice": choice, "gpu_chosen": str(choice.get("uri", "")).startswith(gpu),
                         "candidates": [{k: c.get(k) for k in ("artifact", "device", "reason")} for c in doc.get("candidates", [])],
                         "rejected": doc.get("rejected", [])}  # fmt: skip

    return parse


def _verify_parse(gpu: str) -> Callable[[int | None, str, str], tuple[bool, Any]]:
    def parse(rc: int | None, out: str, err: str) -> tuple[bool, Any]:
        doc = json_out(out)
        results = doc.get("results", [])
        gpu_ok = any(r.get("ok") and str(r.get("device", "")).startswith(gpu) for r in results)
        return rc == 0 and bool(doc.get("ok")) and gpu_ok, {"ok": doc.get("ok"), "gpu_verified": gpu_ok, "results": results,
                                                            "integrity": doc.get("integrity")}  # fmt: skip

    return parse


def _bench_parse(rc: int | None, out: str, err: str) -> tuple[bool, Any]:
    doc = json_out(out)
    keep = ("candidate", "device", "scenario", "batch", "p50_ms", "p90_ms", "p99_ms", "min_ms", "iterations", "items_per_second",
            "load_ms", "first_call_ms", "spread", "threads")  # fmt: skip
    return rc == 0 and bool(doc.get("ok")), {
        "results": [{k: r.get(k) for k in keep} for r in doc.get("results", [])],
        "skipped_baselines": doc.get("skipped_baselines"), "errors": doc.get("errors"), "recorded": doc.get("recorded")}  # fmt: skip


def summarize(steps: list[Step], gpu: str) -> dict[str, Any]:
    """The numbers a reader wants from the steps: per model and batch, the GPU artifact,
    the CPU artifact and PyTorch on each device, p50 ms; and each proof's verdict."""
    by = {s.name: s for s in steps}
    out: dict[str, Any] = {"steps": {s.name: s.status for s in steps}}
    if "host" in by and isinstance(by["host"].result, dict):
        out["host"] = {k: by["host"].result.get(k) for k in ("gpus", "cpu", "cores", "python", "glibc")}
    if "versions" in by and isinstance(by["versions"].result, dict):
        v = by["versions"].result
        out["versions"] = {k: x for k, x in (v.get("versions") or {}).items() if x} | {"torch_cuda": v.get("torch_cuda")}
    torch_runs = {m: by[f"torch:{m}"].result for m in MODELS if isinstance(by.get(f"torch:{m}", Step("")).result, dict)}
    out["torch_loads_program_pt2"] = {m: r["sources"].get("program.pt2", {}).get("ok") for m, r in torch_runs.items()}
    out["torch_matches_golden"] = {m: {f"{c['source']}@{c['device']}": c["ok"] for c in r["checks"]} for m, r in torch_runs.items()}
    table = []
    for m in MODELS:
        rows: dict[int, dict[str, Any]] = {}
        bench, torch_ = by.get(f"bench:{m}"), by.get(f"torch:{m}")
        for r in (bench.result or {}).get("results", []) if bench and isinstance(bench.result, dict) else []:
            side = "hxc_gpu" if str(r.get("device", "")).startswith(gpu) else "hxc_cpu"
            rows.setdefault(r["batch"], {})[f"{side}_p50_ms"] = r.get("p50_ms")
            rows[r["batch"]][f"{side}_artifact"] = r.get("candidate")
        for t in (torch_.result or {}).get("timings", []) if torch_ and isinstance(torch_.result, dict) else []:
            key = f"torch_{t['device']}_{'factory' if t['source'] == 'factory' else 'pt2'}_p50_ms"
            rows.setdefault(t["batch"], {})[key] = t.get("p50_ms")
        for batch, row in sorted(rows.items()):
            gpu_ms = row.get("hxc_gpu_p50_ms")
            torch_ms = row.get("torch_cuda_factory_p50_ms") or row.get("torch_cuda_pt2_p50_ms")
            if gpu_ms and torch_ms:
                row["hxc_gpu_speedup_vs_torch_cuda"] = round(torch_ms / gpu_ms, 3)
            table.append({"model": m, "batch": batch, **row})
    out["latency"] = table
    sel = {k.split(":", 1)[1]: (s.result or {}).get("gpu_chosen") for k, s in by.items() if k.startswith("select:") and s.result}
    ver = {k.split(":", 1)[1]: (s.result or {}).get("gpu_verified") for k, s in by.items() if k.startswith("verify:") and s.result}
    out["select_picks_gpu"], out["gpu_verified"] = sel, ver
    for name in ("pool", "serve"):
        if name in by and isinstance(by[name].result, dict):
            out[name] = by[name].result.get("verdict")
    return out


def summary_lines(doc: dict[str, Any]) -> list[str]:
    s = doc.get("summary") or {}
    lines = [f"steps: {', '.join(f'{k} {v}' for k, v in s.get('steps', {}).items())}"]
    lines += [f"{name}: {json.dumps(s[name])}" for name in ("host", "versions") if name in s]
    for r in s.get("latency", []):
        cols = ", ".join(f"{k.removesuffix('_p50_ms')} {v:.3g} ms" for k, v in r.items() if k.endswith("_p50_ms") and v)
        speedup = r.get("hxc_gpu_speedup_vs_torch_cuda")
        lines.append(f"{r['model']} batch {r['batch']}: {cols}" + (f"; hxc GPU {speedup}x torch CUDA" if speedup else ""))
    verdicts = ("select_picks_gpu", "gpu_verified", "torch_loads_program_pt2", "torch_matches_golden", "pool", "serve")
    lines += [f"{name}: {json.dumps(s[name])}" for name in verdicts if name in s]
    lines.append(f"ok: {doc.get('ok')} ({doc.get('seconds')} s of {doc.get('budget_s')} s)")
    return lines


# --------------------------------------------------------------------------------------
# Here, without a GPU: both halves, as close to the GPU host as this machine comes


def _dist_closure(names: Sequence[str]) -> set[str]:
    """The installed distributions `names` need, themselves included (this interpreter's)."""
    import importlib.metadata as md
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen.add(key)
        for raw in dist.requires or []:
            req = Requirement(raw)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def host_like_venv(root: Path) -> Path:
    """A fresh virtualenv like the GPU host's Python: it has torch and numpy (this
    interpreter's, linked in through a .pth file) and no IREE, no hxc, no starlette."""
    import importlib.metadata as md

    subprocess.run([sys.executable, "-m", "venv", root], check=True, timeout=300)
    linked = root / "host-packages"
    linked.mkdir()
    for key in _dist_closure(["torch", "numpy"]):
        dist = md.distribution(key)
        site = Path(dist.locate_file(""))
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if (site / top).exists() and not (linked / top).exists():
                (linked / top).symlink_to(site / top)
    [site_packages] = root.glob("lib/python3*/site-packages")
    (site_packages / "host-packages.pth").write_text(f"{linked}\n")
    return root / "bin" / "python"


def dry_run(args: argparse.Namespace) -> int:
    """Both halves here: the local half for this Python with the GPU played by Vulkan
    (lavapipe), then the remote half from a fresh host-like virtualenv."""
    folder = (REPO / args.dir).resolve()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    if not (args.reuse and (folder / "local.json").is_file()):
        local(argparse.Namespace(dir=args.dir, gpu_target=args.gpu_target, cpu_target=CPU_TARGET, python_version=version,
                                 glibc=GLIBC, limit_mib=TRAVEL_LIMIT // MIB))  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="hxc-dry-host-") as tmp:
        python = host_like_venv(Path(tmp) / "host")
        argv = [python, HERE, "remote", "--dir", args.dir, "--out", args.out or folder / "out", "--gpu", args.gpu,
                "--torch-devices", "cpu", "--budget", str(args.budget), "--scale", str(args.scale),
                "--python", python]  # fmt: skip
        # The remote half starts as it does there: from the tree, by the host's Python, without this checkout on its path.
        return subprocess.run([str(a) for a in argv], env=_child_env(), cwd=REPO).returncode


# --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_check.sh", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("local", help="build the wheels and bundles the GPU host needs (here; network)")
    p.add_argument("--dir", default=".gpu_check", help="where, relative to the repo (ignored by git)")
    p.add_argument("--gpu-target", default=GPU_TARGET)
    p.add_argument("--cpu-target", default=CPU_TARGET)
    p.add_argument("--python-version", default=PYTHON_VERSION, help="the GPU host's Python")
    p.add_argument("--glibc", default=GLIBC, help="the newest manylinux glibc the wheels may need")
    p.add_argument("--limit-mib", type=int, default=TRAVEL_LIMIT // MIB, help="tree + folder must fit in this")
    p = sub.add_parser("remote", help="the proof, on the GPU host (one command, --budget seconds)")
    p.add_argument("--dir", default=".gpu_check")
    p.add_argument("--out", default=None, help="results folder [default: $OUT, else DIR/out]")
    p.add_argument("--gpu", default="cuda", help="the GPU's IREE driver (vulkan for a dry run)")
    p.add_argument("--cpu", default="cpu")
    p.add_argument("--torch-devices", default="cuda,cpu", help="devices PyTorch is timed on")
    p.add_argument("--python", default=sys.executable, help="the host's Python, with torch [default: this one]")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all steps together")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every step's time cap (slow hosts)")
    p.add_argument("--min-time", type=float, default=0.5, help="seconds of timed calls per contender")
    p = sub.add_parser("dry-run", help="both halves here, Vulkan (lavapipe) standing in for the GPU")
    p.add_argument("--dir", default=".gpu_check-dry")
    p.add_argument("--out", default=None)
    p.add_argument("--gpu", default="vulkan")
    p.add_argument("--gpu-target", default="vulkan:spirv")
    p.add_argument("--budget", type=float, default=1500)
    p.add_argument("--scale", type=float, default=5.0)
    p.add_argument("--reuse", action="store_true", help="keep DIR from an earlier dry run instead of building it again")
    args = ap.parse_args(argv)
    run = {"local": local, "remote": remote, "dry-run": dry_run}
    try:
        return run[args.command](args)
    except CheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
