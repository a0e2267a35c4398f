"""The `hxc` command: parse, call the library, render. No work happens here.

Heavy imports (torch, IREE) live inside the commands so `hxc --help` is instant.
Every expected failure is an HxcError: one line on stderr (or a JSON object with
--json) and its own exit code. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from hxc import __version__
from hxc.errors import ExitCode, HxcError

JSON_HELP = "Print a machine-readable JSON result on stdout instead of tables."


def _command(fn: Callable[..., int | None]) -> Callable[..., None]:
    """Turn HxcErrors into one-line messages (or JSON) and exit codes."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        from hxc import ui

        as_json = kwargs.get("as_json", False)
        try:
            code = fn(*args, **kwargs)
        except HxcError as e:
            if as_json:
                ui.print_json({"ok": False, "error": str(e), "exit_code": int(e.exit_code)})
            else:
                ui.error(str(e))
            sys.exit(int(e.exit_code))
        except KeyboardInterrupt as e:
            signum = e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT
            ui.error(f"{'terminated' if signum == signal.SIGTERM else 'interrupted'}; nothing was written")
            sys.exit(128 + signum)
        except OSError as e:
            # The environment, not hxc: a full disk, a read-only or forbidden path.
            if e.errno not in _ENVIRONMENT_ERRNOS:
                raise
            if as_json:
                ui.print_json({"ok": False, "error": _os_error(e), "exit_code": int(ExitCode.ERROR)})
            else:
                ui.error(_os_error(e))
            sys.exit(int(ExitCode.ERROR))
        sys.exit(int(code or 0))

    return wrapper


_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                       errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.EMFILE, errno.ENOMEM}  # fmt: skip


def _os_error(e: OSError) -> str:
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e}; nothing was written"


def _terminate_like_interrupt(signum: int, frame: Any) -> None:
    # SIGTERM (kill, docker stop, CI cancellation) cleans up exactly as Ctrl-C does:
    # running compiles are killed and no half-written output is left.
    raise KeyboardInterrupt(signum)


def _quiet_libraries() -> None:
    # torch and iree-turbine warn about their own internals on every export; users
    # cannot act on those, so they are hidden unless -v is given.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")
    os.environ.setdefault("TORCH_LOGS", "-all")
    logging.getLogger("torch").setLevel(logging.ERROR)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="hxc")
@click.option("-v", "--verbose", count=True, help="Show more: -v for hxc's decisions, -vv for library warnings too.")
def main(verbose: int) -> None:
    """Compile a PyTorch model once for every kind of hardware, and run it anywhere.

    \b
    hxc compile model.pt2 --targets cpu,cuda,rocm,vulkan -o model.hxc
    hxc inspect model.hxc
    hxc verify model.hxc
    hxc run model.hxc --input x.npy
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s", stream=sys.stderr)
    if threading.current_thread() is threading.main_thread():  # only there can Python handle signals
        signal.signal(signal.SIGTERM, _terminate_like_interrupt)
    if verbose < 2:
        _quiet_libraries()


# --- compile -------------------------------------------------------------------------


@main.command()
@click.argument("model")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Bundle directory to write. [default: MODEL_NAME.hxc]")
@click.option("-t", "--targets", default="all", show_default=True,
              help="Comma-separated families (cpu, cuda, rocm, vulkan, all) or exact variants (cuda:sm_89). See `hxc targets`.")  # fmt: skip
@click.option("-b", "--backends", default="iree", show_default=True,
              help="Engines that build artifacts, comma-separated: iree (every target), onnxruntime (ONNX program on "
                   "ONNX Runtime: cpu, cuda, rocm), inductor (AOTInductor for this CPU and torch build); all = every "
                   "one this host can build, whose failures then never block the bundle. See `hxc targets`.")  # fmt: skip
@click.option("-i", "--input", "inputs", multiple=True, metavar="SPEC",
              help="Input shape and dtype, e.g. 1x3x224x224xf32; `?` makes a dimension dynamic (?x128xi64). Repeat per input.")  # fmt: skip
@click.option("--dynamic-batch", is_flag=True, help="Make dimension 0 of every input dynamic.")
@click.option("--allow-pickle", is_flag=True, help="Allow loading a pickled nn.Module (torch.save(model)); this runs code from the file.")
@click.option("--weights", type=click.Choice(["auto", "inline", "shared"]), default="auto", show_default=True,
              help="shared: store parameters once per bundle (weights.irpa) for all artifacts; inline: inside each "
                   "artifact; auto: shared from 16 MiB of parameters (or with bf16 parameters).")  # fmt: skip
@click.option("-p", "--precision", "precisions", default="fp32", show_default=True, metavar="LIST",
              help="Compute precisions to build, e.g. fp32,fp16,bf16: one artifact per target and precision, same "
                   "interface. The loader picks a reduced one only when allowed.")  # fmt: skip
@click.option("--tune", is_flag=True,
              help="For targets this host can run, try the family's alternative flag sets, time each here, and keep "
                   "the fastest (the search is recorded in the manifest).")  # fmt: skip
@click.option("--allow-partial", is_flag=True, help="Write the bundle even if some targets fail (failures are recorded in it).")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=None, help="Targets compiled at once. [default: CPU count]")
@click.option("--no-cache", is_flag=True, help="Recompile everything instead of reusing cached artifacts.")
@click.option("--cache-dir", type=click.Path(path_type=Path), envvar="HXC_CACHE_DIR", help="Compile cache location. [env: HXC_CACHE_DIR; default: ~/.cache/hxc]")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@_command
def compile(model: str, output: Path | None, targets: str, backends: str, inputs: tuple[str, ...], dynamic_batch: bool,
            allow_pickle: bool, weights: str, precisions: str, tune: bool, allow_partial: bool, jobs: int | None, no_cache: bool,
            cache_dir: Path | None, as_json: bool) -> int:  # fmt: skip
    """Compile MODEL into a bundle with one artifact per target (and backend).

    MODEL is a torch.export archive (.pt2), a TorchScript archive, a pickled module
    (with --allow-pickle), an ONNX model, or a Python factory `file.py:make_model` /
    `package.module:make_model` returning a module and example inputs.

    \b
    hxc compile model.pt2 -o model.hxc
    hxc compile model.pt2 --targets cpu,cuda:sm_89,rocm:gfx942
    hxc compile net.py:make_model --input ?x3x224x224xf32
    hxc compile model.pt2 -t cpu --backends iree,onnxruntime,inductor
    """
    from hxc import targets as registry
    from hxc import ui
    from hxc.engines import resolve_backends

    variants = registry.resolve(targets)  # bad names fail before any slow work
    resolve_backends(backends)
    wanted = _precisions(precisions)
    from hxc.compiler.build import build_bundle
    from hxc.compiler.imported import ImportOptions

    out = output or Path(_default_name(model) + ".hxc")
    options = ImportOptions(inputs=inputs, dynamic_batch=dynamic_batch, allow_pickle=allow_pickle, weights=weights)  # type: ignore[arg-type]
    with ui.CompileProgress(enabled=not as_json) as progress:
        result = build_bundle(
            model, out, variants, backends=backends, options=options, precisions=wanted, allow_partial=allow_partial,
            jobs_parallel=jobs, cache_dir=False if no_cache else (cache_dir or True), on_event=progress.on_event,
            on_stage=progress.set_stage, tune=_tuner() if tune else None, tune_engine=_engine_tuner() if tune else None,
        )  # fmt: skip
    failed = result.failed
    code = ExitCode.OK
    if failed and not result.written:
        code = ExitCode.PARTIAL if len(failed) < result.total else ExitCode.ERROR
    if as_json:
        ui.print_json({"ok": code == ExitCode.OK, "exit_code": int(code), **_build_json(result)})
        return code
    if result.written:
        ui.out.print(f"[green]wrote[/green] {out}  ({result.total - len(failed)} artifacts, "
                     f"{sum(r.seconds for r in (*result.results, *result.built)):.1f}s of compile time, "
                     f"{result.timings.get('compile', 0):.1f}s wall)")  # fmt: skip
    for note in result.notes:
        ui.warn(note)
    for skipped in result.skipped:
        ui.warn(f"skipped {skipped}: that backend cannot generate {skipped.split('@')[1]} code for {skipped.split(':')[0]}")
    for r in failed:
        ui.error(f"{r.id}: {r.error}")
    if failed and not result.written:
        what = f"{len(failed)} of {result.total} targets failed"
        hint = "; pass --allow-partial to write a bundle without them" if code == ExitCode.PARTIAL else ""
        ui.error(f"{what}; nothing was written{hint}")
    elif failed:
        ui.warn(f"{len(failed)} target(s) failed and are recorded as failed in the bundle")
    return code


def _tuner():
    from hxc.bench.tune import tune

    return tune


def _engine_tuner():
    from hxc.bench.tune import tune_built

    return tune_built


def _precisions(text: str) -> list[str]:
    from hxc.errors import UsageError
    from hxc.manifests.schema import PRECISIONS

    wanted = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in wanted if p not in PRECISIONS]
    if bad or not wanted:
        raise UsageError(f"unknown precision {', '.join(bad) or repr(text)}", hint=f"choose from: {', '.join(PRECISIONS)}")
    return wanted


def _default_name(model: str) -> str:
    if ":" in model and not Path(model).exists():
        return model.rpartition(":")[2]
    return Path(model).stem


def _build_json(result: Any) -> dict[str, Any]:
    from hxc.manifests.schema import to_json

    return {
        "bundle": str(result.output),
        "written": result.written,
        "timings": {k: round(v, 3) for k, v in result.timings.items()},
        "artifacts": [to_json(a) for a in result.manifest.artifacts],
        "skipped": result.skipped,
        "notes": result.notes,
    }


# --- targets / inspect ---------------------------------------------------------------


@main.command()
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@_command
def targets(as_json: bool) -> None:
    """List target families and their variants (* = compiled by default)."""
    from hxc import targets as registry
    from hxc import ui

    fams = registry.families()
    if as_json:
        ui.print_json([
            {"family": f.name, "summary": f.summary, "backend": f.backend, "drivers": list(f.drivers),
             "variants": [{"name": v.name, "id": v.id, "default": v.default, "summary": v.summary,
                           "binary": v.binary, "aliases": list(v.aliases), "flags": list(v.flags)} for v in f.variants]}
            for f in fams
        ])  # fmt: skip
        return
    t = ui.table("target", "", "binary", "for", title="Targets (* = default for the family)")
    for f in fams:
        for v in f.variants:
            t.add_row(v.id, "*" if v.default else "", v.binary, v.summary)
    ui.out.print(t)
    from hxc.engines import engine, engine_names

    b = ui.table("backend", "families", "here", "what", title="Backends (--backends; iree is the default)")
    for e in map(engine, engine_names()):
        why = e.missing_for_build()
        b.add_row(e.name, ", ".join(e.families), "[green]builds[/green]" if why is None else f"[red]{why}[/red]", e.summary)
    ui.out.print(b)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@_command
def inspect(bundle: Path, as_json: bool) -> None:
    """Show a bundle's manifest: model, signature, toolchain, artifacts, profiles."""
    from hxc import ui
    from hxc.manifests import read_manifest
    from hxc.manifests.schema import to_json

    m = read_manifest(bundle)
    if as_json:
        ui.print_json(to_json(m))
        return
    info = ui.table("", "", title=f"Bundle {bundle}  (schema {m.schema_version})")
    info.add_row("model", f"{m.model.name}  ({m.model.source_format}: {m.model.source})")
    info.add_row("source sha256", m.model.source_sha256)
    for s in m.signature.inputs:
        info.add_row("input", f"{s.name}: {s.format()}")
    for s in m.signature.outputs:
        info.add_row("output", f"{s.name}: {s.format()}")
    tc = m.toolchain
    info.add_row("built with", f"hxc {tc.hxc}, IREE {tc.iree_compiler}, iree-turbine {tc.iree_turbine}, torch {tc.torch}")
    info.add_row("created", m.created)
    ui.out.print(info)
    ui.out.print()
    t = ui.table("artifact", "status", "binary", "driver", "size", "compile", "sha256", "notes", title="Artifacts")
    for a in m.artifacts:
        status = "[green]ok[/green]" if a.status == "ok" else "[red]failed[/red]"
        note = a.verified or "" if a.status == "ok" else (a.error or "")
        t.add_row(a.id, status, a.binary, a.driver, ui.human_size(a.size),
                  f"{a.compile_seconds:.1f}s" if a.compile_seconds is not None else "-", (a.sha256 or "")[:12], note)  # fmt: skip
    ui.out.print(t)
    if m.profiles:
        ui.out.print()
        from hxc.bench.report import profiles_table

        ui.out.print(profiles_table(m))


# --- runtime commands ----------------------------------------------------------------


DEVICE_OPTION = click.option(
    "-d", "--device", envvar="HXC_DEVICE", default=None,
    help="Force a device: a driver (vulkan, local-task, cuda, hip), a family (cpu) or an artifact id. [env: HXC_DEVICE]",
)  # fmt: skip
PRECISION_OPTION = click.option("--precision", default=None, help="Allow reduced-precision artifacts of this precision (fp16, bf16).")
TOLERANCE_OPTION = click.option("--tolerance", type=float, default=None,
                                help="Allow reduced-precision artifacts whose recorded error vs fp32 is at most this.")  # fmt: skip
POLICY_OPTION = click.option("--policy", type=click.Choice(["latency", "throughput"]), default="latency", show_default=True,
                             help="What recorded profiles rank by.")  # fmt: skip


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@DEVICE_OPTION
@POLICY_OPTION
@PRECISION_OPTION
@TOLERANCE_OPTION
@click.option("--explain", is_flag=True, help="List every artifact, accepted or rejected, with the reason.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@_command
def select(bundle: Path, device: str | None, policy: str, precision: str | None, tolerance: float | None,
           explain: bool, as_json: bool) -> int:  # fmt: skip
    """Show which artifact `hxc.runtime.load` would pick on this host, and why."""
    from hxc import ui
    from hxc.manifests import read_manifest
    from hxc.runtime import probe_host
    from hxc.runtime import select as choose

    sel = choose(read_manifest(bundle), probe_host(), policy=policy, device=device, precision=precision, tolerance=tolerance)
    if as_json:
        ui.print_json({
            "ok": sel.best is not None, "policy": sel.policy, "forced": sel.forced,
            "choice": sel.best and {"artifact": sel.best.artifact.id, "device": sel.best.device.label, "uri": sel.best.device.uri},
            "candidates": [{"artifact": c.artifact.id, "device": c.device.label, "reason": c.reason} for c in sel.candidates],
            "rejected": [{"artifact": r.artifact.id, "reason": r.reason} for r in sel.rejected],
        })  # fmt: skip
    elif explain:
        ui.out.print(sel.explain(), markup=False)
    elif sel.best:
        ui.out.print(f"{sel.best.artifact.id} on {sel.best.device.label}  ({sel.best.reason})", markup=False)
    if sel.best is None:
        if not as_json:
            ui.error("no artifact in this bundle can run on this host (see --explain)")
        return ExitCode.NO_COMPATIBLE_ARTIFACT
    return ExitCode.OK


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-i", "--input", "inputs", multiple=True, required=True, metavar="FILE",
              help="A .npy file per input, in order, or one .npz holding them all.")  # fmt: skip
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Save the outputs to this .npz file.")
@DEVICE_OPTION
@PRECISION_OPTION
@TOLERANCE_OPTION
@click.option("--strict", is_flag=True, help="Fail instead of falling back when --device cannot be used.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@_command
def run(bundle: Path, inputs: tuple[str, ...], output: Path | None, device: str | None, precision: str | None,
        tolerance: float | None, strict: bool, as_json: bool) -> None:  # fmt: skip
    """Run BUNDLE on input arrays and print (or save) the outputs."""
    import numpy as np

    from hxc import runtime, ui
    from hxc.arrays import read_array_files

    arrays = read_array_files(inputs)
    model = runtime.load(bundle, device=device, strict=strict, precision=precision, tolerance=tolerance)
    outputs = model.run_flat(arrays)
    if output is not None:
        from hxc.manifests.bundle import atomic_savez

        atomic_savez(output, {f"output_{i}": o for i, o in enumerate(outputs)})
    if as_json:
        ui.print_json({
            "ok": True, "artifact": model.artifact.id, "device": model.device.label, "saved_to": output and str(output),
            "outputs": [{"name": s.name, "dtype": s.dtype, "shape": list(o.shape), "values": o.astype(np.float64).ravel()[:16].tolist()}
                        for s, o in zip(model.signature.outputs, outputs)],
        })  # fmt: skip
        return
    ui.err.print(f"[dim]ran {model.artifact.id} on {model.device.label}[/dim]")
    with np.printoptions(precision=5, threshold=20, edgeitems=3):
        for s, o in zip(model.signature.outputs, outputs):
            ui.out.print(f"{s.name} {'x'.join(map(str, o.shape))}x{s.dtype}:", markup=False)
            ui.out.print(str(o), markup=False)
    if output is not None:
        ui.err.print(f"[dim]saved outputs to {output}[/dim]")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@DEVICE_OPTION
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@_command
def verify(bundle: Path, device: str | None, as_json: bool) -> int:
    """Check every file of BUNDLE against its manifest's sha256 (exit 5 on any
    difference, for every artifact, runnable here or not), then run the golden sample
    on every artifact this host can run and compare with the reference outputs
    (PyTorch's, or ONNX Runtime's for ONNX models; exit 6 on a mismatch)."""
    from hxc import ui
    from hxc.runtime.verify import verify_bundle

    report = verify_bundle(bundle, device=device)
    results, code = report.results, report.exit_code
    if as_json:
        ui.print_json({"ok": report.ok, "exit_code": int(code), "integrity": list(report.integrity),
                       "results": [r.__dict__ for r in results]})  # fmt: skip
        return code
    for problem in report.integrity:
        ui.error(f"integrity: {problem}")
    t = ui.table("artifact", "device", "result", "max abs err", "max rel err", title=f"Golden-sample check of {bundle}")
    for r in results:
        verdict = "[green]match[/green]" if r.ok else f"[red]{'error: ' + r.error if r.error else 'MISMATCH'}[/red]"
        t.add_row(r.artifact, r.device, verdict, _g(r.max_abs), _g(r.max_rel))
    if results:
        ui.out.print(t)
    elif not report.integrity:
        ui.error("no artifact in this bundle can run on this host (see `hxc select --explain`)")
    return code


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


@main.command()
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@_command
def doctor(as_json: bool) -> None:
    """Show what this host offers: IREE drivers, devices, architectures, CPU features."""
    from hxc import ui
    from hxc.runtime import probe_host
    from hxc.targets.cuda import find_ptxas, ptxas_version

    p = probe_host()
    ptxas = find_ptxas()
    if as_json:
        from hxc.manifests.schema import to_json

        ui.print_json({
            "host": to_json(p.host()), "os": p.os, "cpu": to_json(p.cpu), "versions": p.versions,
            "probe_ms": round(p.seconds * 1000, 2), "ptxas": ptxas and {"path": ptxas, "version": ptxas_version()},
            "drivers": [{"name": s.name, "family": s.family, "available": s.available, "reason": s.reason,
                         "devices": [to_json(d) for d in s.devices]} for s in p.drivers],
        })  # fmt: skip
        return
    info = ui.table("", "", title="Host")
    info.add_row("host", f"{p.hostname}  ({p.os})")
    info.add_row("cpu", f"{p.cpu.model}, {p.cpu.cores} cores, {p.cpu.isa}")
    info.add_row("versions", ", ".join(f"{k} {v}" for k, v in p.versions.items()))
    info.add_row("ptxas", f"{ptxas} ({ptxas_version()})" if ptxas else "not found: CUDA PTX is not checked at compile time")
    info.add_row("probe", f"{p.seconds * 1000:.1f} ms")
    ui.out.print(info)
    ui.out.print()
    t = ui.table("driver", "family", "status", "device", "type", "arch", title="IREE drivers and devices")
    for s in p.drivers:
        if not s.devices:
            t.add_row(s.name, s.family, "[red]absent[/red]", s.reason or "", "", "")
        for d in s.devices:
            t.add_row(s.name, s.family, "[green]ok[/green]", d.name + (f" ({d.driver_version})" if d.driver_version else ""), d.kind, d.arch or "?")
    ui.out.print(t)
    ui.out.print()
    ui.out.print(f"[bold]CPU features[/bold] ({len(p.cpu.features)}): " + " ".join(p.cpu.features), soft_wrap=True)


# --- bench / profiles / report ---------------------------------------------------------


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--baseline", default="auto", show_default=True,
              help="Baselines to time next to the artifacts: torch, torch-compile, onnxruntime, none (comma-separated). "
                   "auto = torch for PyTorch bundles, onnxruntime for ONNX ones.")  # fmt: skip
@DEVICE_OPTION
@click.option("--batch", "batches", default="8,32", show_default=True, help="Offline-scenario batch sizes (models with a dynamic batch).")
@click.option("--min-time", type=float, default=1.0, show_default=True, help="Seconds of timed calls per contender, at least.")
@click.option("--min-iterations", type=int, default=100, show_default=True,
              help="Timed calls per contender, at least (p99 needs 100 to be observed rather than interpolated).")
@click.option("--max-time", type=float, default=60.0, show_default=True, help="Stop a slow contender after this many seconds.")
@click.option("--no-record", is_flag=True, help="Do not write the profiles into the bundle.")
@click.option("--allow-pickle", is_flag=True,
              help="Let the PyTorch baselines load a program whose weights torch pickled; this runs code from the bundle.")  # fmt: skip
@click.option("--fail-if-slower-than", "gate", default=None, metavar="BASELINE",
              help="Exit with code 7 if the fastest artifact is slower than this baseline (e.g. torch) in single-stream.")  # fmt: skip
@click.option("--margin", type=float, default=0.0, show_default=True,
              help="Tolerated slowdown for the gate (0.05 = 5%; negative: a required speed-up, -0.5 = 2x faster).")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@_command
def bench(bundle: Path, baseline: str, device: str | None, batches: str, min_time: float, min_iterations: int,
          max_time: float, no_record: bool, allow_pickle: bool, gate: str | None, margin: float, as_json: bool) -> int:  # fmt: skip
    """Time every artifact this host can run next to PyTorch, and record the results as
    profiles in the bundle (which the runtime loader then uses to choose)."""
    from hxc import ui
    from hxc.bench.measure import Budget
    from hxc.bench.report import profiles_table, row_json, rows
    from hxc.bench.run import run_bench
    from hxc.manifests import read_manifest

    manifest = read_manifest(bundle)
    names = _baselines(baseline, manifest.model.source_format)
    if gate and gate not in names:
        raise HxcError(f"--fail-if-slower-than {gate}: that baseline is not measured", hint=f"add --baseline {gate}")
    try:
        offline = [int(b) for b in batches.split(",") if b.strip()]
    except ValueError:
        raise HxcError(f"--batch takes comma-separated integers, not {batches!r}") from None
    budget = Budget(min_iterations=min_iterations, min_seconds=min_time, max_seconds=max_time)
    with ui.err.status("benchmarking…", spinner="dots") as status:
        result = run_bench(bundle, baselines=names, device=device, offline_batches=offline, budget=budget,
                           record=not no_record, allow_pickle=allow_pickle,
                           on_progress=lambda s: status.update(f"benchmarking: {s}"))  # fmt: skip
    table_rows = rows(manifest, result.profiles)
    verdict = _gate(result.profiles, gate, margin) if gate else None
    code = ExitCode.REGRESSION if verdict and not verdict["passed"] else ExitCode.OK
    if as_json:
        from hxc.manifests.schema import to_json

        ui.print_json({"ok": code == ExitCode.OK, "exit_code": int(code), "host": to_json(result.host),
                       "recorded": result.recorded, "results": [row_json(r) for r in table_rows], "gate": verdict,
                       "errors": result.errors})  # fmt: skip
        return code
    ui.out.print(profiles_table(manifest, result.profiles))
    for e in result.errors:
        ui.warn(f"not measured: {e}")
    if result.recorded:
        ui.err.print(f"[dim]recorded {len(result.profiles)} profiles in {bundle}[/dim]")
    if verdict:
        msg = verdict["message"]
        ui.out.print(f"[green]gate passed:[/green] {msg}") if verdict["passed"] else ui.error(f"gate failed: {msg}")
    return code


def _baselines(text: str, source_format: str) -> list[str]:
    if text == "auto":
        return ["onnxruntime"] if source_format == "onnx" else ["torch"]
    if text == "none":
        return []
    return [b.strip() for b in text.split(",") if b.strip() and b.strip() != "none"]


def _gate(profiles: list, baseline: str, margin: float) -> dict:
    name = {"torch": "torch:eager", "torch-compile": "torch:compile"}.get(baseline, baseline)
    single = [p for p in profiles if p.scenario == "single-stream"]
    base = next((p for p in single if p.candidate == name), None)
    if base is None:
        raise HxcError(f"--fail-if-slower-than {baseline}: that baseline was not measured", hint=f"add --baseline {baseline}")
    arts = [p for p in single if p.artifact_sha256 is not None]
    best = min(arts, key=lambda p: p.latency.p50_ms)
    ratio = best.latency.p50_ms / base.latency.p50_ms
    passed = ratio <= 1 + margin
    return {"baseline": name, "best": best.candidate, "best_p50_ms": best.latency.p50_ms,
            "baseline_p50_ms": base.latency.p50_ms, "ratio": round(ratio, 4), "margin": margin, "passed": passed,
            "message": f"{best.candidate} p50 {best.latency.p50_ms:.3g} ms vs {name} {base.latency.p50_ms:.3g} ms "
                       f"({ratio:.2f}x the baseline's time, allowed {1 + margin:.2f}x)"}  # fmt: skip


@main.group()
def profiles() -> None:
    """Benchmark profiles recorded in bundles."""


@profiles.command("merge")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@_command
def profiles_merge(bundle: Path, sources: tuple[Path, ...], as_json: bool) -> None:
    """Merge profiles recorded elsewhere (copies of this bundle, or their profiles.json,
    e.g. from CI jobs on different runners) into BUNDLE."""
    from hxc import ui
    from hxc.manifests.merge import merge_profiles

    result = merge_profiles(bundle, list(sources))
    if as_json:
        ui.print_json({"ok": True, "added": result.added, "hosts": result.hosts, "skipped": result.skipped})
        return
    ui.out.print(f"merged {result.added} new profile(s); {bundle} now has profiles from {result.hosts} host(s)")
    for why in result.skipped:
        ui.warn(f"skipped: {why}")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="report.html for the full page, or chart.svg for just the chart.")  # fmt: skip
@_command
def report(bundle: Path, output: Path) -> None:
    """Write an HTML report (or SVG chart) comparing devices and hosts across all of a
    bundle's recorded profiles."""
    from hxc import ui
    from hxc.bench.report import html_report, svg_chart
    from hxc.manifests import read_manifest
    from hxc.manifests.bundle import atomic_write

    m = read_manifest(bundle)
    if not m.profiles:
        raise HxcError(f"{bundle}: no profiles recorded yet", hint="run `hxc bench` first")
    text = svg_chart(m) if output.suffix.lower() == ".svg" else html_report(m)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(output, text.encode())
    ui.err.print(f"[dim]wrote {output}[/dim]")


if __name__ == "__main__":
    main()
