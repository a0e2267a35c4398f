"""The `hxc` command: parse, call the library, render. No work happens here.

Heavy imports (torch, IREE) live inside the commands so `hxc --help` is instant.
Every expected failure is an HxcError: one line on stderr (or a JSON object with
--json) and its own exit code. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import functools
import importlib
import logging
import math
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from hxc import __version__
from hxc.bench.baselines import NAMES as BASELINE_NAMES
from hxc.dtypes import PRECISIONS
from hxc.errors import ExitCode, HxcError, UsageError
# Light (the cryptography library loads only to sign or verify), so `hxc --help` stays quick.
from hxc.manifests.signing import MAX_SEQUENCE, MIN_SEQUENCE_ENV, SIGNED_PROFILES_ENV, TRUSTED_KEYS_ENV, TrustPolicy
# Found by file name, nothing imported: the routing policies `hxc serve --policy` offers.
from hxc.pool.policies import policy_names

ROUTING_POLICIES = policy_names()

JSON_HELP = "Print a machine-readable JSON result on stdout instead of tables."


class CommaList(click.ParamType):
    """A comma-separated list, each item checked by click, so that a bad item is a usage
    error (exit 2) before any work starts: `fp32,fp16`, `8,32`."""

    def __init__(self, name: str, *, choices: tuple[str, ...] = (), positive_ints: bool = False) -> None:
        self.name = name
        self.choices = choices
        self.positive_ints = positive_ints

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, list):
            return value  # already converted (a default)
        items = [x.strip() for x in str(value).split(",") if x.strip()]
        if not items:
            self.fail(f"{value!r} lists nothing", param, ctx)
        if self.positive_ints:
            if not all(x.isdigit() and int(x) > 0 for x in items):
                self.fail(f"{value!r} is not a comma-separated list of positive integers", param, ctx)
            return [int(x) for x in items]
        if bad := [x for x in items if x not in self.choices]:
            self.fail(f"unknown {', '.join(map(repr, bad))}; choose from {', '.join(self.choices)}", param, ctx)
        return list(dict.fromkeys(items))


class _Hxc(click.Group):
    """click's own usage errors the way hxc reports every mistake: one line on stderr
    (a JSON object with --json) and exit code 2."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:  # fmt: skip
        argv = list(sys.argv[1:] if args is None else args)
        try:
            return super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # bare `hxc`: the help, as click shows it
            e.show()
            sys.exit(e.exit_code)
        except click.UsageError as e:
            from hxc import ui

            where = f" (see `{e.ctx.command_path} -h`)" if e.ctx is not None else ""
            if "--json" in argv:
                ui.print_json({"ok": False, "error": e.format_message(), "exit_code": int(ExitCode.USAGE)})
            else:
                ui.error(e.format_message() + where)
            sys.exit(int(ExitCode.USAGE))
        except click.Abort:
            from hxc import ui

            ui.error("interrupted; nothing was written")
            sys.exit(130)


class LazyChoice(click.Choice):
    """A click.Choice whose names come from the module that defines them, imported only
    when click needs them (parsing the option, or its command's help), so `hxc --help`
    stays quick and the names are written in one place."""

    def __init__(self, names: Callable[[], Sequence[str]]) -> None:
        self._names = names
        self.case_sensitive = True

    @property  # type: ignore[override]
    def choices(self) -> tuple[str, ...]:
        return tuple(self._names())


def _command(fn: Callable[..., int | None]) -> Callable[..., None]:
    """Turn HxcErrors into one-line messages (or JSON) and exit codes."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        as_json = kwargs.get("as_json", False)
        if threading.current_thread() is threading.main_thread():  # only there can Python handle signals
            signal.signal(signal.SIGTERM, _terminate_like_interrupt)
        ctx = click.get_current_context()
        try:
            from hxc import ui

            # The trust options over the environment, resolved once and handed to the
            # library explicitly (`_trust()`); the environment itself is never changed.
            # Fails closed, in every command: e.g. HXC_TRUSTED_KEYS set but empty.
            given = ctx.meta.get(_TRUST_META, {})
            ctx.meta[_TRUST_POLICY] = TrustPolicy.from_env({**os.environ, **given}).checked()
            code = fn(*args, **kwargs)
        except HxcError as e:
            if as_json:
                ui.print_json({"ok": False, "error": str(e), "exit_code": int(e.exit_code)})
            else:
                ui.error(str(e))
            sys.exit(int(e.exit_code))
        except KeyboardInterrupt as e:
            from hxc import ui

            signum = e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT
            ui.error(f"{'terminated' if signum == signal.SIGTERM else 'interrupted'}; nothing was written")
            if signum == signal.SIGTERM:
                # Everything was cleaned up on the way here (and compile children die with
                # hxc). Leave now: an interrupt raised while a C extension ran Python code
                # (torch's import does) makes CPython end a caught interrupt by killing
                # itself with SIGINT at exit, and a second SIGTERM during finalisation
                # would meet the default handler; either way not 143.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(128 + signum)
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


_TRUST_META = "hxc.trust_env"  # the trust options given, as the variables they stand for
_TRUST_POLICY = "hxc.trust"  # the command's resolved TrustPolicy


def _trust() -> TrustPolicy:
    """What every bundle this command reads must prove: its trust options, else
    $HXC_TRUSTED_KEYS, $HXC_MIN_SEQUENCE and $HXC_REQUIRE_SIGNED_PROFILES."""
    return click.get_current_context().meta[_TRUST_POLICY]


def _trust_args() -> dict[str, Any]:
    """`_trust()` as the keyword arguments of read_manifest and hxc.runtime.load."""
    t = _trust()
    return {"trusted_keys": t.keys, "min_sequence": t.min_sequence, "require_signed_profiles": t.signed_profiles}


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


@click.group(name="hxc", cls=_Hxc, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
    if verbose < 2:
        _quiet_libraries()


# --- compile -------------------------------------------------------------------------


@main.command()
@click.argument("model")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Bundle to write: a directory, or one file if it ends in .hxcb. [default: MODEL_NAME.hxc]")
@click.option("-t", "--targets", default="all", show_default=True,
              help="Comma-separated families (cpu, cuda, rocm, vulkan, all) or exact variants (cuda:sm_89). See `hxc targets`.")  # fmt: skip
@click.option("-b", "--backends", default="iree", show_default=True,
              help="Engines that build artifacts, comma-separated: iree (every target), onnxruntime (ONNX program on "
                   "ONNX Runtime: cpu, cuda, rocm), inductor (AOTInductor for this CPU and torch build); all = every "
                   "one this host can build, whose failures then never block the bundle. See `hxc targets`.")  # fmt: skip
@click.option("-i", "--input", "inputs", multiple=True, metavar="SPEC",
              help="Input shape and dtype, e.g. 1x3x224x224xf32; `?` makes a dimension dynamic (?x128xi64). Repeat per input.")  # fmt: skip
@click.option("--dynamic-batch", is_flag=True, help="Make dimension 0 of every input dynamic.")
@click.option("--example", type=click.Path(path_type=Path), metavar="NPZ",
              help="Example inputs for the golden sample (.npz; arrays named like the inputs, or input_0, ...), where "
                   "generated ones are meaningless (shapes, indices); output_0, ... in it are used as expected outputs "
                   "when the reference cannot run.")  # fmt: skip
@click.option("--allow-pickle", is_flag=True, help="Allow loading a pickled nn.Module (torch.save(model)); this runs code from the file.")
@click.option("--weights", type=click.Choice(["auto", "inline", "shared"]), default="auto", show_default=True,
              help="shared: store parameters once per bundle (weights.irpa) for all artifacts; inline: inside each "
                   "artifact; auto: shared from 16 MiB of parameters (or with bf16 parameters).")  # fmt: skip
@click.option("-p", "--precision", "precisions", type=CommaList("LIST", choices=tuple(PRECISIONS)), default="fp32",
              show_default=True,
              help="Compute precisions to build, e.g. fp32,fp16,bf16: one artifact per target and precision, same "
                   "interface. Language models also build int8 and int4 (weight-only quantisation). The loader "
                   "picks a reduced one only when allowed.")  # fmt: skip
@click.option("--group-size", type=click.IntRange(min=1), default=None, metavar="N",
              help="int8/int4: input features per scale. [default: 128]")
@click.option("--tune", is_flag=True,
              help="For targets this host can run, try the family's alternative flag sets, time each here, and keep "
                   "the fastest (the search is recorded in the manifest).")  # fmt: skip
@click.option("--iree-flag", "iree_flags", multiple=True, metavar="FAMILY[:VARIANT]:--FLAG",
              help="Pass an IREE compiler flag to one target family or variant, e.g. vulkan:--iree-vulkan-target=rdna3 "
                   "or cpu:host:--iree-opt-level=O2. Repeatable. Recorded in the artifact's flags and the cache key.")  # fmt: skip
@click.option("--max-context", type=click.IntRange(min=1), default=None, metavar="N",
              help="Language models: tokens one sequence may hold, prompt and output. [default: min(the model's maximum, 4096, its sliding window)]")
@click.option("--slots", type=click.IntRange(min=1), default=1, show_default=True,
              help="Language models: sequences the KV cache holds (decode runs one token for each).")
@click.option("--prefill-chunk", "prefill_chunk", type=CommaList("N[,N...]", positive_ints=True), default=None,
              help="Language models: prompt tokens one prefill call reads; several sizes build one prefill function each "
                   "(e.g. 8,128: `hxc serve` reads a prompt in 8s while other streams decode, so they stay smooth, "
                   "and in 128s when alone, for a sooner first token). [default: 32]")
@click.option("--stages", default=None, metavar="auto|N|at:NAME,...",
              help="Cut the model into consecutive stages, each compiled as an artifact of its own per target with "
                   "its own weights (the manifest's `stages` records what crosses each cut): N balances the stages' "
                   "FLOPs over module boundaries (a ModuleList's blocks, top-level children); at:layer3,layer4 cuts "
                   "before those submodules; auto is 2 for now. A language model is cut at its decoder layers "
                   "(at:model.layers.12), each stage holding its layers' KV cache. [default: whole]")  # fmt: skip
@click.option("--no-mixed-step", "no_mixed_step", is_flag=True,
              help="Language models of several slots: leave out `mixed`, the decode step that carries a prefill chunk "
                   "(a smaller artifact and a shorter compile; `hxc serve` then reads a prompt beside running streams "
                   "in calls of its own).")
@click.option("--allow-partial", is_flag=True, help="Write the bundle even if some targets fail (failures are recorded in it).")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=None, help="Targets compiled at once. [default: CPU count]")
@click.option("--no-cache", is_flag=True, help="Recompile everything instead of reusing cached artifacts.")
@click.option("--cache-dir", type=click.Path(path_type=Path), envvar="HXC_CACHE_DIR", help="Compile cache location. [env: HXC_CACHE_DIR; default: ~/.cache/hxc]")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@_command
def compile(model: str, output: Path | None, targets: str, backends: str, inputs: tuple[str, ...], dynamic_batch: bool,
            example: Path | None, allow_pickle: bool, weights: str, precisions: list[str], group_size: int | None, tune: bool,
            iree_flags: tuple[str, ...], max_context: int | None, slots: int, prefill_chunk: list[int] | None,
            stages: str | None, no_mixed_step: bool, allow_partial: bool, jobs: int | None, no_cache: bool, cache_dir: Path | None, as_json: bool) -> int:  # fmt: skip
    """Compile MODEL into a bundle with one artifact per target (and backend).

    MODEL is a torch.export archive (.pt2), a TorchScript archive, a pickled module
    (with --allow-pickle), an ONNX model, a Python factory `file.py:make_model` /
    `package.module:make_model` returning a module and example inputs (or a
    transformers causal LM, or (model, tokenizer)), or a Hugging Face model directory
    (config.json, *.safetensors: Llama and GPT-2), which `hxc generate` then runs.

    \b
    hxc compile model.pt2 -o model.hxc
    hxc compile model.pt2 --targets cpu,cuda:sm_89,rocm:gfx942
    hxc compile net.py:make_model --input ?x3x224x224xf32
    hxc compile model.pt2 -t cpu --backends iree,onnxruntime,inductor
    hxc compile ./my-llama/ -t cpu,vulkan --max-context 2048
    hxc compile net.py:make_model --stages at:layer3       # two stages, cut before layer3
    hxc compile ./my-llama/ --stages 2                     # a language model's layers in two stages
    """
    from hxc import frontends, ui
    from hxc import targets as registry

    variants = registry.resolve(targets)  # bad names fail before any slow work
    extra_flags = registry.parse_extra_flags(iree_flags)
    from hxc.build import build_bundle
    from hxc.compiler.imported import ImportOptions
    from hxc.targets.cpu import GLOBAL_DATA_TILING

    out = output or Path(frontends.recognise(model).model_name(model) + ".hxc")
    options = ImportOptions(inputs=inputs, dynamic_batch=dynamic_batch, allow_pickle=allow_pickle, weights=weights,  # type: ignore[arg-type]
                            example=str(example) if example else None, max_context=max_context, slots=slots,
                            prefill_chunk=tuple(prefill_chunk) if prefill_chunk else None, group_size=group_size,
                            stages=stages, mixed_step=not no_mixed_step)
    with ui.CompileProgress(enabled=not as_json) as progress:
        result = build_bundle(
            model, out, variants, backends=backends, options=options, precisions=precisions, allow_partial=allow_partial,
            jobs=jobs, cache_dir=cache_dir, use_cache=not no_cache, on_event=progress.on_event, on_stage=progress.set_stage,
            tune=_tuner() if tune else None, extra_flags=extra_flags,
        )  # fmt: skip
    failed, code = result.failed, result.exit_code
    if as_json:
        ui.print_json({"ok": code == ExitCode.OK, "exit_code": int(code), **_build_json(result)})
        return code
    if result.written:
        ui.out.print(f"[green]wrote[/green] {out}  ({result.total - len(failed)} artifacts, "
                     f"{sum(b.seconds for b in result.built):.1f}s of compile time, "
                     f"{result.timings.get('compile', 0):.1f}s wall)")  # fmt: skip
    for st in result.manifest.stages if result.written else ():
        crossing = sum(t.bytes for t in st.inputs)
        ui.out.print(f"  stage {st.index}: {st.first_module or '(operations)'} .. {st.last_module or '(operations)'}, "
                     f"{st.flops / 1e6:.3g} MFLOP, weights {st.weights_bytes / 2**20:.3g} MiB, "
                     f"{len(st.inputs)} tensor(s) in ({crossing / 2**10:.3g} KiB)", markup=False)  # fmt: skip
    if result.written and result.manifest.golden_note:
        ui.warn(f"no golden outputs ({result.manifest.golden_note}): `hxc verify` has nothing to compare against; "
                "pass --example inputs.npz with inputs the reference can run (or expected outputs as output_0, ...)")
    for b in result.built:
        if b.fallback:
            used = "IREE's other data-tiling path" if GLOBAL_DATA_TILING in b.options else "without hxc's speed flags"
            ui.warn(f"{b.id}: compiled with {used}: the default flags failed ({b.fallback})")
    for note in result.notes:
        ui.warn(note)
    for s in result.skipped:
        ui.warn(f"skipped {s.target}@{s.precision}: {s.reason}")
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


def _build_json(result: Any) -> dict[str, Any]:
    from hxc.manifests.schema import to_json

    return {
        "bundle": str(result.output),
        "written": result.written,
        "timings": {k: round(v, 3) for k, v in result.timings.items()},
        "artifacts": [to_json(a) for a in result.manifest.artifacts],
        "stages": [to_json(s) for s in result.manifest.stages],
        "skipped": [to_json(s) for s in result.skipped],
        "golden_outputs": result.manifest.golden_outputs,
        "golden_note": result.manifest.golden_note,
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


def _trust_option(env: str, value: Callable[[Any], str | None]) -> Callable[..., Any]:
    """A callback that records an option's value as the environment variable `env`
    stands for it; _command resolves them over the real environment into the command's
    TrustPolicy (`_trust()`), which the command hands to every read of the bundle, in
    this process and in its worker processes."""

    def callback(ctx: click.Context, param: click.Parameter, given: Any) -> Any:
        text = value(given)
        if text is not None:
            ctx.meta.setdefault(_TRUST_META, {})[env] = text
        return given

    return callback


TRUSTED_KEYS_OPTION = click.option(
    "--trusted-keys", multiple=True, metavar="PATH", expose_value=False,
    # Given but empty (`--trusted-keys ""`) is exported as such, and refused: never "no keys required".
    callback=_trust_option(TRUSTED_KEYS_ENV, lambda v: os.pathsep.join(v) if v else None),
    help="Require a valid signature by one of these public keys (NAME.pub files or directories of them) before "
         "any file of the bundle is used. Repeatable. [env: HXC_TRUSTED_KEYS, paths separated by ':']",
)  # fmt: skip
MIN_SEQUENCE_OPTION = click.option(
    "--min-sequence", type=click.IntRange(0, MAX_SEQUENCE), metavar="N", expose_value=False,
    callback=_trust_option(MIN_SEQUENCE_ENV, lambda v: None if v is None else str(v)),
    help="Refuse a bundle whose trusted signature carries a sequence number below N (`hxc sign --sequence`): an "
         "older bundle put back in place. Needs trusted keys. [env: HXC_MIN_SEQUENCE]",
)  # fmt: skip
SIGNED_PROFILES_OPTION = click.option(
    "--require-signed-profiles", is_flag=True, expose_value=False,
    callback=_trust_option(SIGNED_PROFILES_ENV, lambda v: "1" if v else None),
    help="Choose by profiles only if a trusted key signed them (`hxc sign --profiles`); otherwise ignore them (the "
         "static order decides; `hxc select --explain` says so). [env: HXC_REQUIRE_SIGNED_PROFILES=1]",
)  # fmt: skip


def _trust_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in (SIGNED_PROFILES_OPTION, MIN_SEQUENCE_OPTION, TRUSTED_KEYS_OPTION):
        fn = option(fn)
    return fn


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@TRUSTED_KEYS_OPTION
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@_command
def inspect(bundle: Path, as_json: bool) -> None:
    """Show a bundle's manifest: model, signature, toolchain, artifacts, profiles,
    and who signed it (verified when trusted keys are given)."""
    from hxc import ui
    from hxc.manifests import read_manifest
    from hxc.manifests.bundle import signature_status
    from hxc.manifests.schema import to_json

    sig = signature_status(bundle, trusted_keys=_trust().keys)
    m = read_manifest(bundle, trusted_keys=False)  # signature_status already checked it if asked to
    if as_json:
        ui.print_json({**to_json(m), "signed_by": list(sig.key_ids), "signature_verified_by": sig.verified_by,
                       "signature_sequence": sig.sequence})  # fmt: skip
        return
    info = ui.table("", "", title=f"Bundle {bundle}  (schema {m.schema_version})")
    info.add_row("model", f"{m.model.name}  ({m.model.source_format}: {m.model.source})")
    info.add_row("source sha256", m.model.source_sha256)
    for fname, fn in m.functions.items():
        at = "" if m.stateless_main else f" of {fname}"
        for s in fn.signature.inputs:
            info.add_row(f"input{at}", f"{s.name}: {s.format()}")
        for s in fn.signature.outputs:
            info.add_row(f"output{at}", f"{s.name}: {s.format()}")
        for st in fn.states:
            info.add_row(f"state{at}", f"{st.name}: {st.tensor().format()} ({st.bytes / 2**20:.2f} MiB, {st.slots} slot(s))")
    if (lm := m.language_model) is not None:
        info.add_row("language model", f"{lm.family}: {lm.layers} layers, vocabulary {lm.vocab_size}, context {lm.max_context}, "
                     f"{lm.slots} slot(s), prefill chunk {', '.join(map(str, lm.chunks))}, KV cache {lm.kv_bytes_per_token} B/token, "
                     f"tokenizer {'yes' if lm.tokenizer_file else 'none'}")  # fmt: skip
    tc = m.toolchain
    info.add_row("built with", f"hxc {tc.hxc}, IREE {tc.iree_compiler}, iree-turbine {tc.iree_turbine}, torch {tc.torch}")
    info.add_row("created", m.created)
    if sig.verified_by:
        sequence = f" (sequence {sig.sequence})" if sig.sequence is not None else ""
        info.add_row("signature", f"[green]verified[/green]: signed by trusted key {sig.verified_by}{sequence}")
    elif sig.key_ids:
        info.add_row("signature", f"signed by key {', '.join(sig.key_ids)} (not checked: no --trusted-keys given)")
    else:
        info.add_row("signature", "unsigned")
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
PRECISION_OPTION = click.option("--precision", default=None,
                                help="Allow reduced-precision artifacts of this precision (fp16, bf16, int8, int4).")
TOLERANCE_OPTION = click.option("--tolerance", type=float, default=None,
                                help="Allow reduced-precision artifacts whose recorded error vs fp32 is at most this.")  # fmt: skip
POLICY_OPTION = click.option("--policy", type=LazyChoice(lambda: importlib.import_module("hxc.runtime.select").POLICIES), default="latency", show_default=True,
                             help="latency: lowest p50; throughput: most items/s; cost: lowest cost per 1,000 items "
                                  "(price per hour / items per second), from recorded profiles.")  # fmt: skip
PLACEMENT_OPTION = click.option(
    "--placement", default=None, metavar="STAGE[-STAGE]:DEVICE,...",
    help="A staged bundle: run each stage on this device, e.g. 0:cpu,1:vulkan or 0-11:cuda,12-23:cpu (devices by "
         "family, driver or target id, as --device takes them). Default: the placement the per-stage profiles "
         "predict best, else the best single device.",
)  # fmt: skip
DEVICE_MEMORY_OPTION = click.option(
    "--device-memory", default=None, metavar="DEVICE=SIZE,...",
    help="A staged bundle: cap a device's memory for the placement, e.g. vulkan=2GiB,cpu=512MiB.",
)  # fmt: skip
SLO_OPTIONS = (
    click.option("--slo-ms", type=click.FloatRange(min=0, min_open=True), default=None, metavar="MS",
                 help="Latency target per call (device time + caller overhead); candidates that meet it rank first."),
    click.option("--slo-percentile", type=click.Choice(["p99", "p50"]), default="p99", show_default=True,
                 help="Which recorded percentile the SLO is judged on (p99 needs >= 100 samples to be more than a weak estimate)."),
    click.option("--prices", "prices_file", type=click.Path(path_type=Path), envvar="HXC_PRICES", default=None,
                 help="Prices TOML for --policy cost. [env: HXC_PRICES; default: ~/.config/hxc/prices.toml, else built-in]"),
)  # fmt: skip


def _slo_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(SLO_OPTIONS):
        fn = option(fn)
    return fn


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@_trust_options
@DEVICE_OPTION
@POLICY_OPTION
@_slo_options
@PRECISION_OPTION
@TOLERANCE_OPTION
@click.option("--explain", is_flag=True, help="List every artifact, accepted or rejected, with the reason (and the cost, SLO and "
                                             "stage placement arithmetic).")
@PLACEMENT_OPTION
@DEVICE_MEMORY_OPTION
@click.option("--pin", "pins", multiple=True, metavar="split",
              help="A staged bundle: place its stages as `--pin split` runs them, each in a worker of its own.")
@click.option("--prompt-tokens", type=click.IntRange(1), default=None, metavar="N",
              help="Language models: also show how `hxc serve` would route a request of N prompt tokens on idle devices "
                   "(its TTFT, TPOT and price per 1,000 output tokens per device, from the bench profiles).")  # fmt: skip
@click.option("--max-tokens", type=click.IntRange(1), default=128, show_default=True, help="... and this many output tokens.")
@click.option("--ttft-ms", type=click.FloatRange(min=0, min_open=True), default=None, help="... with this TTFT target.")
@click.option("--tpot-ms", type=click.FloatRange(min=0, min_open=True), default=None, help="... and this TPOT target.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@_command
def select(bundle: Path, device: str | None, policy: str, slo_ms: float | None, slo_percentile: str,
           prices_file: Path | None, precision: str | None, tolerance: float | None, explain: bool, placement: str | None,
           device_memory: str | None, pins: tuple[str, ...], prompt_tokens: int | None, max_tokens: int, ttft_ms: float | None,
           tpot_ms: float | None, as_json: bool) -> int:  # fmt: skip
    """Show which artifact `hxc.runtime.load` would pick on this host, and why.

    \b
    hxc select model.hxc --explain
    hxc select model.hxc --policy cost --slo-ms 150 --explain
    hxc select llm.hxc --policy cost --prompt-tokens 512 --ttft-ms 300 --tpot-ms 50 --explain
    hxc select staged.hxc --explain --device-memory cpu=1GiB     # where each stage runs, and the arithmetic
    """
    from hxc import ui
    from hxc.manifests.bundle import read_bundle
    from hxc.runtime import probe_host
    from hxc.runtime import select as choose
    from hxc.runtime.place import plan_stages
    from hxc.runtime.prices import load_prices

    prices = load_prices(prices_file) if policy == "cost" or prices_file else None
    read = read_bundle(bundle, _trust())
    probe = probe_host()
    sel = choose(read.manifest, probe, policy=policy, device=device, precision=precision, tolerance=tolerance,
                 slo_ms=slo_ms, slo_percentile=slo_percentile, prices=prices, profiles_note=read.profiles_note)  # fmt: skip
    plan = None
    pin = _stage_pin(pins, bool(read.manifest.stages), pool=False)
    if sel.candidates or placement is not None or device_memory is not None:
        plan = plan_stages(read.manifest, sel, probe.host().id, policy=policy, placement=placement,
                           device_memory=device_memory, pin=pin)  # fmt: skip
    routing = None
    if prompt_tokens is not None:
        routing = _lm_routing(read.manifest, sel, prices_file, prompt_tokens, max_tokens, ttft_ms, tpot_ms, slo_ms, policy)
    if as_json:
        ui.print_json({
            "ok": sel.best is not None, "policy": sel.policy, "forced": sel.forced, "note": sel.note,
            "profiles_note": sel.profiles_note,
            "slo": sel.slo and {"ms": sel.slo.ms, "percentile": sel.slo.percentile}, "currency": sel.currency,
            "choice": sel.best and {"artifact": sel.best.artifact.id, "device": sel.best.device.label, "uri": sel.best.device.uri},
            "candidates": [_candidate_json(c) for c in sel.candidates],
            "rejected": [{"artifact": r.artifact.id, "reason": r.reason} for r in sel.rejected],
            **({"routing": routing} if routing is not None else {}),
            **({"placement": plan.to_json()} if plan is not None else {}),
        })  # fmt: skip
    elif explain:
        ui.out.print(sel.explain(), markup=False, soft_wrap=True)
        if plan is not None:
            ui.out.print(plan.explain(), markup=False, soft_wrap=True)
        if routing is not None:
            ui.out.print(_routing_text(routing), markup=False, soft_wrap=True)
    elif plan is not None:
        ui.out.print(f"{plan.describe()}  ({plan.source}: {plan.reason})", markup=False, soft_wrap=True)
    elif sel.best:
        ui.out.print(f"{sel.best.artifact.id} on {sel.best.device.label}  ({sel.best.reason})", markup=False)
        if sel.note:
            ui.warn(sel.note)
    if sel.best is None and not as_json:
        ui.error("no artifact in this bundle can run on this host (see --explain)")
    return sel.exit_code


def _lm_routing(manifest: Any, sel: Any, prices_file: Path | None, prompt_tokens: int, max_tokens: int,
                ttft_ms: float | None, tpot_ms: float | None, slo_ms: float | None, policy: str) -> dict[str, Any]:  # fmt: skip
    """How `hxc serve` would route a hypothetical request on idle devices: each accepted
    artifact's estimate from its profiles, ranked by the routing policy (`policy` where it
    is one, else latency) — the same arithmetic as the server's /routing view."""
    from hxc.pool import policies
    from hxc.pool.lm_estimate import DeviceLoad, LMSpeed, estimate
    from hxc.runtime import probe_host
    from hxc.runtime.prices import load_prices
    from hxc.runtime.select import profiles_for

    lm = manifest.language_model
    if lm is None:
        raise UsageError("--prompt-tokens is for a language-model bundle")
    if prompt_tokens >= lm.max_context:
        raise UsageError(f"--prompt-tokens {prompt_tokens}: the bundle's context holds {lm.max_context} tokens")
    max_tokens = min(max_tokens, lm.max_context - prompt_tokens)
    host, prices = probe_host(), load_prices(prices_file)
    name = policy if policy in policies.policy_names() else policies.DEFAULT_POLICY
    request = policies.Request(max_tokens, slo_ms, ttft_ms, tpot_ms)
    rows, candidates = [], []
    for c in sel.candidates:
        speed = LMSpeed.from_profiles(profiles_for(manifest, c.artifact, c.device, host.host().id)[0])
        price = prices.price(c.device, host.cpu.cores)
        idle = DeviceLoad(0, lm.slots, 0, 0, (), lm.slots * lm.max_context)
        est, why = estimate(speed, idle, prompt_tokens, max_tokens, min(lm.chunks), price and price.per_hour,
                            lm.kv_bytes_per_token, largest_chunk=max(lm.chunks))  # fmt: skip
        key = f"{c.artifact.id} on {c.device.label}"
        candidates.append(policies.Candidate(key, est, 0, c))
        rows.append({"artifact": c.artifact.id, "device": c.device.label, "precision": c.artifact.precision,
                     "measured": why is not None, "ttft_ms": est.ttft_ms, "tpot_ms": est.tpot_ms,
                     "finish_ms": est.finish_ms, "price_per_1k_tokens": est.price_per_unit,
                     "meets_targets": policies.base.expected_to_meet(request, est),
                     "prefill_ms": why and why.prefill_ms, "step_ms": why and why.step_ms})  # fmt: skip
    order = {c.name: i for i, c in enumerate(policies.choose(name, request, candidates))}
    for row in rows:
        row["rank"] = order[f"{row['artifact']} on {row['device']}"]
    rows.sort(key=lambda r: r["rank"])
    return {"policy": name, "prompt_tokens": prompt_tokens, "max_tokens": max_tokens, "ttft_ms": ttft_ms,
            "tpot_ms": tpot_ms, "slo_ms": slo_ms, "currency": prices.currency, "devices": rows}  # fmt: skip


def _routing_text(routing: dict[str, Any]) -> str:
    def ms(x: float | None) -> str:
        return "unmeasured" if x is None else f"{x:.1f} ms"

    targets = ", ".join(f"{k} <= {routing[k]:g}" for k in ("ttft_ms", "tpot_ms", "slo_ms") if routing[k] is not None)
    lines = [f"\nRouting a request of {routing['prompt_tokens']} prompt and {routing['max_tokens']} output tokens on idle "
             f"devices, policy {routing['policy']}" + (f" ({targets})" if targets else "") + ":"]  # fmt: skip
    for r in routing["devices"]:
        price = "no price" if r["price_per_1k_tokens"] is None else f"{r['price_per_1k_tokens']:.6f} {routing['currency']}/1k tokens"
        verdict = "meets" if r["meets_targets"] else "misses" if r["measured"] else "cannot judge"
        lines.append(f"  {r['rank'] + 1}. {r['artifact']} on {r['device']}: TTFT {ms(r['ttft_ms'])} (prefill {ms(r['prefill_ms'])}), "
                     f"TPOT {ms(r['tpot_ms'])}, {price}; {verdict} the targets")  # fmt: skip
    return "\n".join(lines)


def _candidate_json(c: Any) -> dict[str, Any]:
    lat = c.latency.latency if c.latency else None
    return {
        "artifact": c.id, "stages": [a.id for a in c.stages], "device": c.device.label, "reason": c.reason,
        "measured_on": c.measured_on,
        "p50_ms": lat and lat.p50_ms, "p99_ms": lat and lat.p99_ms, "samples": lat and lat.iterations,
        "items_per_second": c.items_per_second,
        "price_per_hour": c.price and c.price.per_hour, "price_source": c.price and c.price.source,
        "cost_per_1k_items": c.cost_per_1k,
        "slo": c.slo and {"met": c.slo.met, "estimate_ms": c.slo.estimate_ms, "device_ms": c.slo.device_ms,
                          "overhead_ms": c.slo.overhead_ms, "samples": c.slo.samples, "weak": c.slo.weak,
                          "caveats": list(c.slo.caveats)},
    }  # fmt: skip


DEVICES_OPTION = click.option(
    "--devices", default=None, metavar="all|LIST",
    help="Use a pool of devices, each in its own worker process: `all`, or a comma-separated list of devices "
         "(drivers, families, artifact ids). Batches are split across them by measured speed.",
)  # fmt: skip
PIN_OPTION = click.option(
    "--pin", "pins", multiple=True, metavar="split|DEVICE=CORES",
    help="Give pool devices their own CPU cores: `split` shares the cores out among CPU-type devices (the CPU and "
         "a software Vulkan device), or DEVICE=CORES per device, e.g. --pin cpu=0-5 --pin vulkan=6,7. A staged "
         "bundle (without --devices): `split` gives each stage a worker of its own, with its share of the cores.",
)  # fmt: skip


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@_trust_options
@click.option("-i", "--input", "inputs", multiple=True, required=True, metavar="FILE",
              help="A .npy file per input, in order, or one .npz holding them all.")  # fmt: skip
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Save the outputs to this .npz file.")
@DEVICE_OPTION
@DEVICES_OPTION
@PIN_OPTION
@PLACEMENT_OPTION
@DEVICE_MEMORY_OPTION
@PRECISION_OPTION
@TOLERANCE_OPTION
@click.option("--strict", is_flag=True, help="Fail instead of falling back when --device cannot be used.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.option("--in-process", is_flag=True,
              help="Run in this process instead of a worker process (faster start; a crash inside IREE then takes hxc down).")  # fmt: skip
@_command
def run(bundle: Path, inputs: tuple[str, ...], output: Path | None, device: str | None, devices: str | None,
        pins: tuple[str, ...], placement: str | None, device_memory: str | None, precision: str | None,
        tolerance: float | None, strict: bool, in_process: bool, as_json: bool) -> None:  # fmt: skip
    """Run BUNDLE on input arrays and print (or save) the outputs.

    \b
    hxc run model.hxc -i x.npy
    hxc run model.hxc -i batch.npy --devices all -o out.npz     # split across every device, with telemetry
    hxc run staged.hxc -i x.npy --placement 0:cpu,1:vulkan       # a staged bundle's stages on two devices
    hxc run staged.hxc -i x.npy --placement 0:cpu,1:cpu --pin split   # a pinned worker per stage

    \b
    A staged bundle whose placement spans several devices, or with --pin split, runs on
    a pipeline of worker processes (one per device, or one per stage when pinned); on one
    device unpinned its stages run as one chain in one worker process (or this one,
    --in-process). --json's `placement.runner` says which.
    """
    import numpy as np

    from hxc import runtime, ui
    from hxc.arrays import read_array_files
    from hxc.dtypes import from_storage, to_storage

    arrays = read_array_files(inputs)
    from hxc.manifests import read_manifest

    # The signature is all this process needs: whatever chooses the artifact reads the profiles.
    manifest = read_manifest(bundle, profiles=False, **_trust_args())
    # bf16 and float8 arrays travel through .npy/.npz files as their raw bits.
    inputs_spec = manifest.signature.inputs
    arrays = [from_storage(a, s.dtype) for a, s in zip(arrays, inputs_spec)] + arrays[len(inputs_spec):]
    pool = None
    placed = {"placement": placement, "device_memory": device_memory}
    if devices:
        if device:
            raise UsageError("--device and --devices exclude each other", hint="--devices cpu,vulkan lists the devices to pool")
        if placement or device_memory:
            raise UsageError("--placement and --device-memory place a staged bundle's stages, not a pool's devices",
                             hint="leave out --devices")  # fmt: skip
        from hxc.pool import Pool

        pool = Pool(bundle, devices, pin=_pin(pins), precision=precision, tolerance=tolerance, trust=_trust())
        with pool:
            outputs = pool.run_flat(arrays)
            stats = pool.stats()
        signature = pool.signature
        what = {"pool": [m.name for m in pool.members]}
        ran = f"ran on a pool of {', '.join(m.name for m in pool.members)}"
        if not pool.splittable:
            # Not an error: the whole batch ran on the best device that had room.
            on = ", ".join(d.name for d in stats.devices if d.items) or "no device"
            ran += f"; the batch was not split ({pool.not_splittable}): it ran whole on {on}"
    else:
        pin = _stage_pin(pins, bool(manifest.stages))
        if pin and in_process:
            raise UsageError("--pin split runs each stage in a worker process of its own", hint="leave out --in-process")
        options = {"strict": strict, "precision": precision, "tolerance": tolerance, **placed, **_trust_args()}
        runner: dict[str, Any] = {"runner": "one process"}
        plan = None
        if manifest.stages and not in_process:
            plan = _stage_plan(bundle, device, precision, tolerance, placement, device_memory, pin)
        if in_process:
            model = runtime.load(bundle, device=device, **options)
            outputs, signature = model.run_flat(arrays), model.signature
            artifact, device_label = model.candidate.id, model.device.label
            plan = model.placement
        elif plan is not None and plan.pipelined:
            # Several devices, or a worker per stage: the pipeline of worker processes.
            from hxc.pool.pipeline import load_pipeline
            from hxc.runtime.loader import check_inputs

            signature = manifest.signature
            check_inputs(signature, arrays)
            with load_pipeline(bundle, placement=plan, precision=precision, tolerance=tolerance, in_flight=1,
                               trust=_trust()) as pipe:  # fmt: skip
                outputs = pipe.run_flat(arrays)
                runner = pipe.to_json()
            artifact = "+".join(dict.fromkeys(a.target_id for a in plan.artifacts))
            device_label = ", ".join(dict.fromkeys(plan.device(k).device.label for k in range(len(plan.assignment))))
        else:
            # In a worker process: an artifact that crashes inside IREE is a one-line error.
            from hxc.pool.worker import run_isolated
            from hxc.runtime.loader import check_inputs

            signature = manifest.signature
            check_inputs(signature, arrays)  # usage mistakes stay exit 2, before any process starts
            from hxc.pool.workers import load_options

            result = run_isolated(bundle, device or "", arrays, load_options={**options, **load_options(_trust())})
            outputs, artifact, device_label = result.outputs, result.artifact, result.device
        what = {"artifact": artifact, "device": device_label}
        ran = f"ran {artifact} on {device_label}"
        if plan is not None:
            what["placement"] = {"placement": plan.flag, "source": plan.source, "reason": plan.reason, "pin": plan.pin,
                                 "stages": plan.to_json()["stages"], **runner}  # fmt: skip
            on = f" on a pipeline of {len(runner['workers'])} workers" if runner["runner"] == "pipeline" else " in one process"
            ran = f"ran {plan.describe()}{on} ({plan.source}: {plan.reason})"
    if output is not None:
        from hxc.manifests.bundle import atomic_savez

        atomic_savez(output, {f"output_{i}": to_storage(o) for i, o in enumerate(outputs)})
    if as_json:
        from hxc.manifests.schema import to_json

        ui.print_json({
            "ok": True, **what, "saved_to": output and str(output),
            "outputs": [{"name": s.name, "dtype": s.dtype, "shape": list(o.shape),
                         "values": o.astype(np.float64).ravel()[:16].tolist(),  # NaN/inf print as null
                         "nonfinite": int(o.size - np.count_nonzero(np.isfinite(o.astype(np.float64))))}
                        for s, o in zip(signature.outputs, outputs)],
            **({"telemetry": to_json(stats)} if pool else {}),
        })  # fmt: skip
        return
    ui.err.print(f"[dim]{ran}[/dim]")
    with np.printoptions(precision=5, threshold=20, edgeitems=3):
        for s, o in zip(signature.outputs, outputs):
            ui.out.print(f"{s.name} {'x'.join(map(str, o.shape))}x{s.dtype}:", markup=False)
            ui.out.print(str(o), markup=False)
    if pool is not None:
        ui.out.print()
        ui.out.print(_telemetry_table(stats))
    if output is not None:
        ui.err.print(f"[dim]saved outputs to {output}[/dim]")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("prompt")
@_trust_options
@click.option("-n", "--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Tokens to generate at most (fewer at an end-of-sequence token or a full context).")
@DEVICE_OPTION
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0 is greedy (Hugging Face's do_sample=False, token for token); above 0 samples.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="Sample among the k most likely tokens (0: all).")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True,
              help="Sample among the most likely tokens whose probabilities add up to p.")
@click.option("--seed", type=int, default=None, help="Seed for sampling: the same seed gives the same tokens on the same artifact.")
@click.option("--token-ids", is_flag=True, help="PROMPT is comma-separated token ids, not text.")
@click.option("--chat", is_flag=True,
              help="PROMPT is the user's message (or a JSON list of {role, content} messages), rendered by the "
                   "bundle's chat template.")  # fmt: skip
@click.option("--stop", "stops", multiple=True, metavar="TEXT",
              help="Stop before this text (repeatable); it is not printed.")
@click.option("--truncate", is_flag=True,
              help="Drop tokens from the start of a prompt too long for the context, to leave room for -n tokens.")
@click.option("--ignore-eos", is_flag=True, help="Do not stop at end-of-sequence tokens.")
@PRECISION_OPTION
@TOLERANCE_OPTION
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@_command
def generate(bundle: Path, prompt: str, max_new_tokens: int, device: str | None, temperature: float, top_k: int,
             top_p: float, seed: int | None, token_ids: bool, chat: bool, stops: tuple[str, ...], truncate: bool,
             ignore_eos: bool, precision: str | None, tolerance: float | None, as_json: bool) -> None:  # fmt: skip
    """Generate text after PROMPT with a language-model BUNDLE, streamed to stdout.

    \b
    hxc generate llm.hxc "Once upon a time" -n 32
    hxc generate llm.hxc "Once upon a time" --temperature 0.8 --top-p 0.9 --seed 1 --device vulkan
    hxc generate llm.hxc 1,306,4966 --token-ids --json
    hxc generate llm.hxc "What is a compiler?" --chat --stop "</s>"
    hxc generate llm.hxc "Once upon a time" --precision int4    # a quantised artifact (hxc compile --precision int4)
    """
    from hxc import runtime, ui

    if token_ids and chat:
        raise UsageError("--token-ids and --chat do not go together")
    given: str | list[int] | None = prompt
    messages = None
    if token_ids:
        try:
            given = [int(t) for t in prompt.replace(" ", "").split(",") if t]
        except ValueError:
            raise UsageError(f"--token-ids: {prompt!r} is not a comma-separated list of integers") from None
    elif chat:
        given, messages = None, _chat_messages(prompt)
    model = runtime.load(bundle, device=device, precision=precision, tolerance=tolerance, **_trust_args())
    stream = model.generate(given, max_new_tokens, messages=messages, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, stop=list(stops), stop_token_ids=[] if ignore_eos else None, truncate=truncate)  # fmt: skip
    for piece in stream:
        if not as_json:
            sys.stdout.write(piece.text)
            sys.stdout.flush()
    r = stream.result()
    if as_json:
        ui.print_json({"ok": True, "text": r.text, "token_ids": list(r.token_ids), "prompt_token_ids": list(r.prompt_token_ids),
                       "finish_reason": r.finish_reason, "artifact": model.artifact.id, "device": model.device.label,
                       "ttft_ms": r.ttft_ms, "tpot_ms": r.tpot_ms, "tokens_per_s": r.tokens_per_s})  # fmt: skip
        return
    sys.stdout.write("\n")
    ui.err.print(f"[dim]{len(r.token_ids)} tokens ({r.finish_reason}) on {model.artifact.id} / {model.device.label}: "
                 f"first after {r.ttft_ms:.1f} ms, then {r.tokens_per_s or 0:.1f} tokens/s[/dim]")  # fmt: skip


def _stage_plan(bundle: Path, device: str | None, precision: str | None, tolerance: float | None,
                placement: str | None, device_memory: str | None, pin: bool = False) -> Any:
    """Where a staged bundle's stages run (None: every stage on `device`), worked out
    here, opening no device, to choose one process or a pipeline, to report it and to
    fail before a worker starts."""
    from hxc.runtime.place import plan_bundle

    return plan_bundle(bundle, device=device, precision=precision, tolerance=tolerance, placement=placement,
                       device_memory=device_memory, pin=pin, trust=_trust())  # fmt: skip


def _stage_pin(pins: tuple[str, ...], staged: bool, pool: bool = True) -> bool:
    """`--pin` without `--devices`: `split` gives each stage of a staged bundle a worker
    of its own; anything else is a one-line usage error (`pool`: the command has --devices)."""
    if not pins:
        return False
    if not staged:
        raise UsageError("--pin needs --devices (a pool of devices), or a staged bundle (a worker per stage)" if pool
                         else "--pin split places a staged bundle's stages (a worker per stage); this bundle has none")  # fmt: skip
    if pins != ("split",):
        raise UsageError("a staged bundle's pipeline takes --pin split (a worker per stage, the cores shared out)",
                         hint="--pin DEVICE=CORES pins a pool's devices (--devices)")  # fmt: skip
    return True


def _chat_messages(prompt: str) -> list[dict[str, Any]]:
    """--chat's PROMPT: one user message, or a JSON list of messages."""
    import json

    if not prompt.lstrip().startswith("["):
        return [{"role": "user", "content": prompt}]
    try:
        messages = json.loads(prompt)
    except ValueError as e:
        raise UsageError(f"--chat: PROMPT starts with '[' but is not a JSON list of messages ({e})") from None
    return messages


def _pin(values: tuple[str, ...]) -> str | dict[str, list[int]] | None:
    if not values:
        return None
    if values == ("split",):
        return "split"
    out: dict[str, list[int]] = {}
    for v in values:
        name, eq, cores = v.partition("=")
        try:
            if not eq or not name:
                raise ValueError
            out[name] = [c for part in cores.split(",") for c in _core_range(part)]
        except ValueError:
            raise UsageError(f"--pin {v!r}: expected `split` or DEVICE=CORES, e.g. cpu=0-5 or vulkan=6,7") from None
    return out


def _core_range(text: str) -> list[int]:
    lo, _, hi = text.strip().partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def _telemetry_table(stats: Any):
    from hxc import ui

    t = ui.table("device", "cores", "items", "chunks", "busy s", "utilisation", "items/s", "backups (rows dropped)", "failures",
                 "queue", "status",
                 title=f"Pool telemetry ({stats.items} items in {stats.wall_s:.3g} s: {stats.items_per_second:.4g} items/s)")  # fmt: skip
    for d in stats.devices:
        status = d.health + (f": {d.reason}" if d.reason else "") + (f"; left out: {d.left_out}" if d.left_out else "")
        t.add_row(f"{d.name} ({d.device})", ",".join(map(str, d.cpus)) if d.cpus else "all", str(d.items), str(d.chunks),
                  f"{d.busy_s:.3g}", f"{d.utilisation:.0%}", f"{d.items_per_second:.4g}" if d.items_per_second else "-",
                  f"{d.backups} ({d.wasted})", str(d.failures), str(d.queue_depth), status)  # fmt: skip
    return t


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@_trust_options
@DEVICE_OPTION
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.option("--in-process", is_flag=True,
              help="Run in this process instead of a worker process (faster start; a crash inside IREE then takes hxc down).")  # fmt: skip
@click.option("--shapes", "shapes", multiple=True, metavar="NAME=DIMS[,...]",
              help="Also check generated inputs of these shapes, e.g. x=1x33x64 (dynamic dimensions only may change); "
                   "repeatable. The reference outputs come from the bundle's own program (needs torch, or onnxruntime "
                   "for ONNX models).")  # fmt: skip
@click.option("--example", "examples", multiple=True, type=click.Path(path_type=Path), metavar="NPZ",
              help="Also check these inputs (.npz, arrays named like the inputs or input_0, ...); its output_0, ... are "
                   "the expected outputs, else the reference computes them as for --shapes. Repeatable.")  # fmt: skip
@_command
def verify(bundle: Path, device: str | None, in_process: bool, as_json: bool, shapes: tuple[str, ...],
           examples: tuple[Path, ...]) -> int:  # fmt: skip
    """Check every file of BUNDLE against its manifest's sha256 (exit 5 on any
    difference, for every artifact, runnable here or not), then run the golden sample
    on every artifact this host can run and compare with the reference outputs
    (PyTorch's, or ONNX Runtime's for ONNX models; exit 6 on a mismatch). A model with
    dynamic dimensions is right only at the sizes it was checked at: --shapes and
    --example add more.

    \b
    hxc verify model.hxc --shapes x=1x33x64 --shapes x=2x512x64
    hxc verify model.hxc --example long_input.npz"""
    from rich.markup import escape

    from hxc import ui
    from hxc.verify import GOLDEN, verify_bundle

    report = verify_bundle(bundle, device=device, isolate=not in_process, shapes=shapes, examples=examples, trust=_trust())
    results, code = report.results, report.exit_code
    if as_json:
        ui.print_json({"ok": report.ok, "exit_code": int(code), "integrity": list(report.integrity),
                       "results": [_verify_json(r) for r in results],
                       "not_run": [{"artifact": n.artifact, "reason": n.reason, "sha256_ok": n.sha256_ok}
                                   for n in report.not_run]})  # fmt: skip
        return code
    for problem in report.integrity:
        ui.error(f"integrity: {problem}")
    several = any(r.sample != GOLDEN for r in results)
    t = ui.table("artifact", "device", *(["inputs"] if several else []), "result", "max abs err", "max rel err",
                 title=f"{'Check' if several else 'Golden-sample check'} of {bundle}")  # fmt: skip
    for r in results:
        verdict = "[green]match[/green]" if r.ok else f"[red]{'error: ' + r.error if r.error else 'MISMATCH'}[/red]"
        t.add_row(r.artifact, r.device, *([r.sample] if several else []), verdict, _g(r.max_abs), _g(r.max_rel))
    for n in report.not_run:
        # Still part of the check: its bytes were hashed, only the golden sample could not run here.
        checked = {True: "sha256 ok", False: "[red]sha256 differs[/red]", None: "no file"}[n.sha256_ok]
        # The reason's first clause; all of it is in --json and `hxc select --explain`.
        t.add_row(n.artifact, "-", *(["-"] if several else []),
                  f"[dim]{checked}; not run: {escape(n.reason.split(': ', 1)[0])}[/dim]", "-", "-")
    if results or report.not_run:
        ui.out.print(t)
    if report.not_run:
        intact = sum(n.sha256_ok is True for n in report.not_run)
        ui.out.print(f"{len(results)} artifact(s) ran the golden sample; the other {len(report.not_run)} were not run here "
                     f"(why: above, or `hxc select --explain`), and {intact} of them matched their sha256", markup=False)  # fmt: skip
    if not results and not report.integrity:
        ui.error("no artifact in this bundle can run on this host (see `hxc select --explain`)")
    return code


def _verify_json(r: Any) -> dict[str, Any]:
    # An infinite error (a wrong shape, inf where PyTorch has a number) prints as null,
    # with `nonfinite` saying so: null alone would read as "not measured".
    errors = [x for x in (r.max_abs, r.max_rel) if x is not None]
    return {"artifact": r.artifact, "device": r.device, "sample": r.sample, "ok": r.ok, "max_abs": r.max_abs,
            "max_rel": r.max_rel, "nonfinite": any(not math.isfinite(x) for x in errors), "error": r.error}


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
@_trust_options
@click.option("--baseline", "baselines", type=CommaList("LIST", choices=(*BASELINE_NAMES, "auto", "none")), default="auto",
              show_default=True,
              help=f"Baselines to time next to the artifacts: {', '.join(BASELINE_NAMES)}, none (comma-separated). "
                   "auto = torch for PyTorch bundles, onnxruntime for ONNX ones.")  # fmt: skip
@DEVICE_OPTION
@click.option("--batch", "batches", type=CommaList("LIST", positive_ints=True), default="8,32", show_default=True,
              help="Offline-scenario batch sizes (models with a dynamic batch).")
@click.option("--min-time", type=float, default=1.0, show_default=True, help="Seconds of timed calls per contender, at least.")
@click.option("--min-iterations", type=int, default=100, show_default=True,
              help="Timed calls per contender, at least (p99 needs 100 to be observed rather than interpolated).")
@click.option("--max-time", type=float, default=60.0, show_default=True, help="Stop a slow contender after this many seconds.")
@click.option("--no-record", is_flag=True, help="Do not write the profiles into the bundle.")
@click.option("--allow-pickle", is_flag=True,
              help="Let the PyTorch baselines load a program whose weights torch pickled; this runs code from the bundle.")  # fmt: skip
@click.option("--fail-if-slower-than", "gate", type=click.Choice(BASELINE_NAMES), default=None,
              help="Exit with code 7 if the fastest artifact is slower than this baseline (e.g. torch) in single-stream.")  # fmt: skip
@click.option("--margin", type=float, default=0.0, show_default=True,
              help="Tolerated slowdown for the gate (0.05 = 5%; negative: a required speed-up, -0.5 = 2x faster).")
@click.option("--pool", "pool_mode", is_flag=True,
              help="Pool mode: each device in its worker process (as `--devices` and `--pin` say): single-stream latency "
                   "and caller overhead per device (recorded), then throughput of each device alone and of the pool, "
                   "interleaved, with per-device utilisation.")  # fmt: skip
@DEVICES_OPTION
@PIN_OPTION
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True, help="Pool mode: interleaved rounds.")
@PLACEMENT_OPTION
@DEVICE_MEMORY_OPTION
@click.option("--in-flight", type=click.IntRange(min=1), default=None, metavar="N",
              help="A staged bundle on its pipeline (a placement across devices, or --pin split): throughput with N "
                   "items in flight (default 4), latency with one, and this process's own CPU time per item.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@_command
def bench(bundle: Path, baselines: list[str], device: str | None, batches: list[int], min_time: float, min_iterations: int,
          max_time: float, no_record: bool, allow_pickle: bool, gate: str | None, margin: float, pool_mode: bool,
          devices: str | None, pins: tuple[str, ...], rounds: int, placement: str | None, device_memory: str | None,
          in_flight: int | None, as_json: bool) -> int:  # fmt: skip
    """Time every artifact this host can run next to PyTorch, and record the results as
    profiles in the bundle (which the runtime loader then uses to choose). A staged
    bundle's stages are also timed alone on each device, to place them.

    \b
    hxc bench model.hxc
    hxc bench model.hxc --pool --pin split       # the device pool: each device alone, and all together
    hxc bench staged.hxc --placement 0:cpu,1:vulkan   # that placement end to end on its pipeline (not recorded)
    hxc bench staged.hxc --placement 0:cpu,1:cpu --pin split --in-flight 4   # a pinned worker per stage

    \b
    With --placement, --device-memory or --in-flight, a staged bundle's placement (given,
    else the solver's) is timed end to end: on a pipeline of worker processes when it
    spans several devices or pins a worker per stage (--pin split), else as one chain
    in this process. Without them, --pin means --pool.
    """
    from hxc import ui
    from hxc.bench.measure import Budget

    placing = placement is not None or device_memory is not None or in_flight is not None
    if pool_mode or devices or (pins and not placing):
        if placing:
            raise UsageError("--placement, --device-memory and --in-flight do not apply to --pool")
        if gate or device:
            raise UsageError("--fail-if-slower-than and --device do not apply to --pool", hint="use --devices")
        budget = Budget(min_iterations=min_iterations, min_seconds=min_time, max_seconds=max_time)
        return _bench_pool(bundle, devices or "all", _pin(pins), budget, min_time, rounds, not no_record, as_json)
    from hxc.bench.report import profiles_table, row_json, rows
    from hxc.bench.run import run_bench
    from hxc.manifests import read_manifest
    from hxc.manifests.schema import to_json

    manifest = read_manifest(bundle, **_trust_args())
    budget = Budget(min_iterations=min_iterations, min_seconds=min_time, max_seconds=max_time)
    if placing:
        if not manifest.stages:
            raise UsageError("--placement, --device-memory and --in-flight time a staged bundle (`hxc compile --stages`)")
        if device is not None or gate is not None or any(b not in ("auto", "none") for b in baselines):
            raise UsageError("--placement, --device-memory and --in-flight time one placement alone",
                             hint="leave out --device, --baseline and --fail-if-slower-than")  # fmt: skip
        plan = _stage_plan(bundle, None, None, None, placement, device_memory, _stage_pin(pins, True))
        if plan is not None and plan.pipelined:
            return _bench_pipeline(bundle, plan, in_flight or 4, budget, as_json)
        if in_flight is not None:
            where = plan.describe() if plan is not None else "one device"
            raise UsageError(f"--in-flight times a pipeline of workers; this placement runs in one process ({where})",
                             hint="place the stages on several devices, or add --pin split")  # fmt: skip
    with ui.err.status("benchmarking…", spinner="dots") as status:
        result = run_bench(bundle, baselines=baselines, device=device, offline_batches=batches, budget=budget,
                           record=not no_record, allow_pickle=allow_pickle, gate=gate, margin=margin, trust=_trust(),
                           on_progress=lambda s: status.update(f"benchmarking: {s}"), placement=placement,
                           device_memory=device_memory)  # fmt: skip
    table_rows = rows(manifest, result.profiles)
    verdict, code = result.gate, result.exit_code
    if as_json:
        gate_json = verdict and {**to_json(verdict), "message": verdict.message}
        ui.print_json({"ok": code == ExitCode.OK, "exit_code": int(code), "host": to_json(result.host),
                       "recorded": result.recorded, "results": [row_json(r) for r in table_rows], "gate": gate_json,
                       "skipped_baselines": [to_json(s) for s in result.skipped_baselines], "errors": list(result.errors)})  # fmt: skip
        return code
    for s in result.skipped_baselines:
        ui.warn(f"skipped baseline {s.baseline}: {s.reason}")
    ui.out.print(profiles_table(manifest, result.profiles))
    for e in result.errors:
        ui.warn(f"not measured: {e}")
    if result.recorded:
        ui.err.print(f"[dim]recorded {len(result.profiles)} profiles in {bundle}[/dim]")
    if verdict:
        ui.out.print(f"[green]gate passed:[/green] {verdict.message}") if verdict.passed else ui.error(f"gate failed: {verdict.message}")
    return code


def _bench_pipeline(bundle: Path, plan: Any, in_flight: int, budget: Any, as_json: bool) -> int:
    from hxc import ui
    from hxc.bench.pipeline import run_pipeline_bench
    from hxc.manifests.schema import to_json

    with ui.err.status("benchmarking the pipeline…", spinner="dots") as status:
        r = run_pipeline_bench(bundle, plan, in_flight=in_flight, budget=budget, trust=_trust(),
                               on_progress=lambda s: status.update(f"benchmarking the pipeline: {s}"))  # fmt: skip
    if as_json:
        ui.print_json({"ok": True, "recorded": False, "host": to_json(r.host), "placement": plan.to_json(),
                       "pipeline": r.to_json()})  # fmt: skip
        return ExitCode.OK
    lat = r.latency
    lines = [f"placement ({plan.source}): {plan.describe()}; {r.pipeline['runner']} of "
             + ", ".join(f"{w['name']} ({', '.join(w['artifacts'])}"
                         + (f"; cores {','.join(map(str, w['cpus']))}" if w["cpus"] else "") + ")"
                         for w in r.pipeline["workers"]),
             f"latency, one in flight: p50 {lat.p50_ms:.4g} ms, p99 {lat.p99_ms:.4g} ms ({lat.iterations} calls); "
             f"caller CPU {r.caller_cpu_ms_per_item_alone:.3g} ms per item",
             f"throughput, {r.in_flight} in flight: {r.items_per_s:.4g} items/s ({r.items} items in {r.seconds:.3g} s); "
             f"caller CPU {r.caller_cpu_ms_per_item:.3g} ms per item ({r.caller_cpu_share:.1%} of a core)",
             "workers busy: " + ", ".join(f"{w.name} {w.busy_share:.0%}" for w in r.workers)]  # fmt: skip
    if (p := plan.placement) is not None:
        lines.append(f"predicted: {p.items_per_s:.4g} items/s (bottleneck {p.bottleneck}), latency {p.latency_ms:.4g} ms")
    ui.out.print("\n".join(lines), markup=False, soft_wrap=True)
    ui.err.print("[dim]not recorded: a profile names one artifact, not a pipeline[/dim]")
    return ExitCode.OK


def _bench_pool(bundle: Path, devices: str, pin: Any, budget: Any, seconds: float, rounds: int, record: bool,
                as_json: bool) -> int:  # fmt: skip
    from hxc import ui
    from hxc.bench.pool import run_pool_bench
    from hxc.bench.report import NOISY_SPREAD, number, percent, ratio
    from hxc.manifests.schema import to_json

    with ui.err.status("benchmarking the pool…", spinner="dots") as status:
        r = run_pool_bench(bundle, devices=devices, pin=pin, budget=budget, seconds=seconds, rounds=rounds, record=record,
                           trust=_trust(), on_progress=lambda s: status.update(f"benchmarking the pool: {s}"))  # fmt: skip
    best = r.best_alone
    summary = {"pool_items_per_second": r.pool_items_per_second, "sum_alone_items_per_second": r.sum_alone,
               "vs_sum": r.pool_items_per_second / r.sum_alone if r.sum_alone else None, "best_alone": best.name,
               "vs_best_alone": r.pool_items_per_second / best.alone_items_per_second if best.alone_items_per_second else None,
               "spread": r.spread, "noisy": r.spread > NOISY_SPREAD, "rounds": r.rounds, "pinned": r.pinned}  # fmt: skip
    if as_json:
        ui.print_json({"ok": True, "host": to_json(r.host), "recorded": r.recorded, **summary,
                       "devices": [to_json(d) for d in r.devices], "profiles": [to_json(p) for p in r.profiles]})  # fmt: skip
        return ExitCode.OK
    t = ui.table("device", "cores", "alone items/s", "in the pool: items", "utilisation", "status",
                 title=f"Pool throughput ({'pinned' if r.pinned else 'unpinned'}; medians of {r.rounds} interleaved rounds)")  # fmt: skip
    for d in r.devices:
        status = d.health + (f": {d.reason}" if d.reason else "") + (f"; left out: {d.left_out}" if d.left_out else "")
        t.add_row(f"{d.name} ({d.device})", ",".join(map(str, d.cpus)) if d.cpus else "all",
                  number(d.alone_items_per_second, 4),
                  str(d.pool_items), f"{d.utilisation:.0%}", status)  # fmt: skip
    ui.out.print(t)
    vs_sum, vs_best = (ratio(x) if x is not None else "-" for x in (summary["vs_sum"], summary["vs_best_alone"]))
    ui.out.print(f"pool: {number(r.pool_items_per_second, 4)} items/s = {vs_sum} the devices' sum alone "
                 f"({number(r.sum_alone, 4)}), {vs_best} the best alone ({best.name}); "
                 f"spread over rounds {percent(r.spread)}", markup=False)  # fmt: skip
    if r.spread > NOISY_SPREAD:
        ui.warn(f"these numbers are noise: the pool's rounds differ by more than {percent(NOISY_SPREAD)} of their median "
                f"(the machine was busy); re-run when it is quieter, or with more --rounds")  # fmt: skip
    lat = ui.table("device", "p50 ms", "p99 ms", "samples", "caller overhead p50 ms", "p99 ms",
                   title="Single-stream through the workers (device time, and what the caller pays beyond it)")  # fmt: skip
    for p in r.profiles:
        o = p.caller_overhead
        lat.add_row(p.candidate, f"{p.latency.p50_ms:.3g}", f"{p.latency.p99_ms:.3g}", str(p.latency.iterations),
                    _g(o.p50_ms if o else None), _g(o.p99_ms if o else None))  # fmt: skip
    ui.out.print()
    ui.out.print(lat)
    if r.recorded:
        ui.err.print(f"[dim]recorded {len(r.profiles)} profiles with caller overhead in {bundle}[/dim]")
    return ExitCode.OK


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
    if output.suffix.lower() == ".svg":
        text = svg_chart(m)
    else:
        from hxc.runtime import probe_host, select

        probe = probe_host()  # the page says which artifact the loader picks on this host
        text = html_report(m, select(m, probe), probe.hostname)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(output, text.encode())
    ui.err.print(f"[dim]wrote {output}[/dim]")


# --- trust: keys, signatures, single-file bundles ------------------------------------


@main.command()
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, metavar="NAME",
              help="Write the private key to NAME (mode 0600) and the public key to NAME.pub.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@_command
def keygen(output: Path, as_json: bool) -> None:
    """Create an Ed25519 key pair for signing bundles.

    \b
    hxc keygen -o ci-signing            # ci-signing (secret) + ci-signing.pub
    hxc sign model.hxc --key ci-signing
    hxc verify model.hxc --trusted-keys ci-signing.pub
    """
    from hxc import ui
    from hxc.manifests.signing import generate_key

    key = generate_key(output)
    if as_json:
        ui.print_json({"ok": True, "key_id": key.key_id, "private_key": str(output), "public_key": key.source})
        return
    ui.out.print(f"key id {key.key_id}: private key {output} (keep it secret), public key {key.source}", markup=False)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-k", "--key", type=click.Path(path_type=Path), required=True, help="Private key from `hxc keygen`.")
@click.option("--sequence", type=click.IntRange(0, MAX_SEQUENCE), default=None, metavar="N",
              help="Sign a sequence number with the manifest (e.g. a release or build number): hosts that require at "
                   "least N (--min-sequence) refuse older bundles signed by the same key.")  # fmt: skip
@click.option("--profiles", "profiles", is_flag=True,
              help="Sign the bundle's profiles as they are now (profiles.sig), for hosts that require signed profiles; "
                   "profiles recorded later need signing again.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@_command
def sign(bundle: Path, key: Path, sequence: int | None, profiles: bool, as_json: bool) -> None:
    """Sign BUNDLE's manifest (which holds the sha256 of every file it runs) with KEY.
    Profiles added later by `hxc bench` are outside the signature and never break it.
    Signing again with another key adds a second signature (key rotation).

    \b
    hxc sign model.hxc --key ci-signing --sequence 42     # refuse anything older with --min-sequence 42
    hxc sign model.hxc --key ci-signing --profiles        # after `hxc bench`: vouch for its profiles too
    """
    from hxc import ui
    from hxc.manifests.bundle import sign_bundle, sign_profiles

    if profiles:
        if sequence is not None:
            raise UsageError("--sequence goes with the manifest's signature, not the profiles'",
                             hint="sign the manifest and the profiles in two runs")  # fmt: skip
        public, count = sign_profiles(bundle, key)
        if as_json:
            ui.print_json({"ok": True, "bundle": str(bundle), "key_id": public.key_id, "profiles": count})
            return
        ui.out.print(f"signed the {count} profiles of {bundle} with key {public.key_id}", markup=False)
        return
    public = sign_bundle(bundle, key, sequence=sequence)
    if as_json:
        ui.print_json({"ok": True, "bundle": str(bundle), "key_id": public.key_id, "sequence": sequence})
        return
    numbered = f" (sequence {sequence})" if sequence is not None else ""
    ui.out.print(f"signed {bundle} with key {public.key_id}{numbered}", markup=False)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="The single-file bundle to write (.hxcb).")
@TRUSTED_KEYS_OPTION
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@_command
def pack(bundle: Path, output: Path, as_json: bool) -> None:
    """Write BUNDLE as one file (an uncompressed tar the loader maps in place), after
    checking every file against the manifest. `hxc.runtime.load` and every command
    accept either form."""
    from hxc import ui
    from hxc.manifests.bundle import pack_bundle

    m = pack_bundle(bundle, output, trusted_keys=_trust().keys)
    if as_json:
        ui.print_json({"ok": True, "bundle": str(bundle), "archive": str(output), "files": len(m.files)})
        return
    ui.out.print(f"wrote {output}  ({len(m.files)} files, {ui.human_size(output.stat().st_size)})", markup=False)


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Directory to create.")
@TRUSTED_KEYS_OPTION
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@_command
def unpack(archive: Path, output: Path, as_json: bool) -> None:
    """Extract a single-file bundle into a new directory, for people to look at. Only
    the files its manifest names are written, each checked first; links, devices,
    paths outside the directory and duplicate names are refused."""
    from hxc import ui
    from hxc.manifests.bundle import unpack_bundle

    m = unpack_bundle(archive, output, trusted_keys=_trust().keys)
    if as_json:
        ui.print_json({"ok": True, "archive": str(archive), "bundle": str(output), "files": len(m.files)})
        return
    ui.out.print(f"unpacked {archive} into {output}  ({len(m.files)} files)", markup=False)


# --- serve ---------------------------------------------------------------------------


@main.command()
@click.argument("models", nargs=-1, required=True, metavar="BUNDLE|DIR|NAME=BUNDLE...")
@_trust_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0 for every interface).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="Port to listen on.")
@click.option("--devices", default="all", show_default=True, metavar="all|LIST",
              help="Devices to load every model on, each in its own worker process: `all`, or a comma-separated list "
                   "(drivers, families, artifact ids).")  # fmt: skip
@PIN_OPTION
@click.option("--policy", type=click.Choice(ROUTING_POLICIES), default=ROUTING_POLICIES[0], show_default=True,
              help="How a request without its own `policy` parameter is routed: the soonest expected finish (first "
                   "token, for a language model), or the cheapest device (price / measured speed; per 1,000 output "
                   "tokens) that meets its targets.")  # fmt: skip
@click.option("--slo-ms", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Default deadline per request, for requests without an `slo_ms` parameter.")
@click.option("--prices", "prices_file", type=click.Path(path_type=Path), envvar="HXC_PRICES", default=None,
              help="Prices TOML for the cost policy. [env: HXC_PRICES; default: ~/.config/hxc/prices.toml, else built-in]")
@click.option("--max-batch-size", default=32, show_default=True, type=click.IntRange(1),
              help="Rows per device call when requests are merged (models with a dynamic batch dimension); 1 turns "
                   "dynamic batching off.")  # fmt: skip
@click.option("--max-queue-delay-ms", default=0.0, show_default=True, type=click.FloatRange(0),
              help="How long the oldest waiting request may wait for others to join its batch.")
@click.option("--max-queue", default=256, show_default=True, type=click.IntRange(1),
              help="Requests per model, queued or running, before the server sheds load (503 with Retry-After); for a "
                   "language model, requests waiting for a place in a device's batch.")  # fmt: skip
@click.option("--kv-cache-mb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Language models: KV cache each device may fill with running sequences (default: its whole cache, "
                   "slots x context); beyond it, new sequences wait and the youngest running one is preempted.")  # fmt: skip
@click.option("--max-streams", type=click.IntRange(1), default=None,
              help="Language models: streamed responses open at once, all models together (503 with Retry-After beyond).")
@click.option("--ttft-ms", "--slo-ttft-ms", "slo_ttft_ms", default=1000.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="Language models: the time-to-first-token target of a request without its own `ttft_ms`: what it is "
                   "routed by, and what /metrics' goodput and deadline misses count by.")  # fmt: skip
@click.option("--tpot-ms", "--slo-tpot-ms", "slo_tpot_ms", default=200.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="Language models: the time-per-output-token target of a request without its own `tpot_ms`.")
@click.option("--precision", "precisions", default="", metavar="LIST",
              help="Language models: also load these reduced-precision variants (e.g. int8,int4), each device's best "
                   "artifact of each, beside its full-precision one. A request runs on them only when its `precision` "
                   "names them.")  # fmt: skip
@click.option("--max-body-mb", default=64.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Largest request body accepted (413 beyond).")
@click.option("--max-receiving-mb", default=256.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Memory all request bodies still arriving may hold together (503 with Retry-After beyond); at least "
                   "--max-body-mb.")  # fmt: skip
@click.option("--body-timeout-s", default=30.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds a request's body may take to arrive after its headers (408 beyond).")
@click.option("--header-timeout-s", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds a connection may take to send a request's headers (closed beyond).")
@click.option("--drain-timeout", default=30.0, show_default=True, type=click.FloatRange(0),
              help="Seconds SIGTERM waits for requests in flight before the server exits.")
@click.option("--api-key", "api_key", envvar="HXC_API_KEY", default=None, metavar="KEY[,KEY...]",
              help="Require one of these keys (Authorization: Bearer KEY, or an api-key header); several so one can be "
                   "rotated. Prefer the environment or --api-key-file: a command line is visible to every user. "
                   "[env: HXC_API_KEY]")  # fmt: skip
@click.option("--api-key-file", type=click.Path(path_type=Path, dir_okay=False), envvar="HXC_API_KEY_FILE", default=None,
              help="Read the keys from a file (one a line, or comma-separated; # comments). [env: HXC_API_KEY_FILE]")
@click.option("--auth-health", is_flag=True, help="Require the key on /v2/health/live and /v2/health/ready too (open by default, for probes).")
@click.option("--open-metrics", is_flag=True, help="Serve /metrics without a key (it needs one by default when keys are set).")
@click.option("--ssl-certfile", type=click.Path(path_type=Path), default=None, help="Serve HTTPS with this PEM certificate (chain).")
@click.option("--ssl-keyfile", type=click.Path(path_type=Path), default=None, help="The certificate's PEM private key (unencrypted).")
@click.option("--ssl-ca-certs", type=click.Path(path_type=Path), default=None,
              help="Require client certificates signed by one of these PEM CA certificates (mutual TLS).")
@click.option("--placement", default=None, metavar="STAGE[-STAGE]:DEVICE,...",
              help="Not built yet for hxc serve: a staged bundle's stages on a pipeline of workers (hxc run and hxc "
                   "bench take it). A staged bundle is served whole on each device.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print events (listening, ready, stopped) as JSON lines on stdout.")
@_command
def serve(models: tuple[str, ...], host: str, port: int, devices: str, pins: tuple[str, ...], policy: str,
          slo_ms: float | None, prices_file: Path | None, max_batch_size: int, max_queue_delay_ms: float, max_queue: int,
          kv_cache_mb: float | None, max_streams: int | None, slo_ttft_ms: float, slo_tpot_ms: float, precisions: str,
          max_body_mb: float,
          max_receiving_mb: float, body_timeout_s: float, header_timeout_s: float, drain_timeout: float, api_key: str | None,
          api_key_file: Path | None, auth_health: bool, open_metrics: bool, ssl_certfile: Path | None, ssl_keyfile: Path | None,
          ssl_ca_certs: Path | None, placement: str | None, as_json: bool) -> None:  # fmt: skip
    """Serve bundles over HTTP with the KServe v2 / Open Inference Protocol (what Triton's
    and KServe's clients speak), routing every request across this host's devices.

    \b
    hxc serve model.hxc                          # the model is named by its manifest
    hxc serve resnet=model.hxc bundles/          # name one; serve every bundle in a directory
    hxc serve model.hxc --host 0.0.0.0 --port 8080 --max-batch-size 16 --max-queue-delay-ms 2
    HXC_API_KEY_FILE=keys.txt hxc serve model.hxc --host 0.0.0.0 --ssl-certfile cert.pem --ssl-keyfile key.pem

    \b
    Each model is loaded on every usable device (one worker process each). A request may
    carry parameters `slo_ms` and `policy` (as --policy). Concurrent requests to a device
    are merged into one call when the model has a dynamic batch dimension. GET /metrics
    for Prometheus; SIGTERM drains requests in flight, then exits.

    \b
    Language models are served with the OpenAI API (POST /v1/completions,
    /v1/chat/completions, GET /v1/models; streamed with "stream": true) and the KServe
    generate extension (POST /v2/models/NAME/generate, /generate_stream), batched
    continuously on each device. Each request is routed by its targets (extra body
    fields or parameters `ttft_ms`, `tpot_ms`, `slo_ms`, `policy`, `precision`; else
    --ttft-ms, --tpot-ms, --policy): `latency` takes the soonest first token that keeps
    the time per token in target, `cost` the cheapest device (price per 1,000 output
    tokens) that meets both. GET /v2/models/NAME/routing?prompt_tokens=N&max_tokens=M
    shows the arithmetic.
    """
    from hxc.extras import require

    require("serve", "hxc serve")
    from hxc.runtime.prices import load_prices
    from hxc.serve.guard import key_digests
    from hxc.serve.models import ServeOptions, find_models
    from hxc.serve.server import print_event, serve as run_server, tls_context

    if max_receiving_mb < max_body_mb:
        raise UsageError(f"--max-receiving-mb ({max_receiving_mb:g}) must be at least --max-body-mb ({max_body_mb:g}), "
                         "or no body of the largest size could be received")  # fmt: skip
    if placement is not None:
        raise UsageError("hxc serve --placement is not built yet: it serves a staged bundle whole on each device",
                         hint="hxc run and hxc bench run a placement on a pipeline of workers; so does "
                              "hxc.pool.load_pipeline")  # fmt: skip
    keys = _api_keys(api_key, api_key_file)
    if auth_health and not keys:
        raise UsageError("--auth-health needs API keys (HXC_API_KEY or --api-key-file)")
    options = ServeOptions(host=host, port=port, devices=devices, pin=_pin(pins), policy=policy, slo_ms=slo_ms,
                           prices=load_prices(prices_file),
                           max_batch_size=max_batch_size, max_queue_delay_ms=max_queue_delay_ms, max_queue=max_queue,
                           max_body_bytes=int(max_body_mb * 1024**2), max_receiving_bytes=int(max_receiving_mb * 1024**2),
                           body_timeout_s=body_timeout_s, header_timeout_s=header_timeout_s, drain_timeout_s=drain_timeout,
                           api_key_digests=key_digests(keys), auth_health=auth_health, open_metrics=open_metrics,
                           ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile, ssl_ca_certs=ssl_ca_certs, trust=_trust(),
                           kv_cache_bytes=int(kv_cache_mb * 1024**2) if kv_cache_mb else None, max_streams=max_streams,
                           slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms,
                           precisions=tuple(p.strip() for p in precisions.split(",") if p.strip()))  # fmt: skip
    tls_context(options)  # a bad certificate is one line before any bundle is read
    run_server(find_models(models, options.trust), options, on_event=print_event(as_json))


def _api_keys(api_key: str | None, key_file: Path | None) -> list[str]:
    """The keys from --api-key / $HXC_API_KEY and --api-key-file. The variable is taken
    out of the environment, so the device worker processes never inherit it."""
    from click.core import ParameterSource

    from hxc import ui
    from hxc.serve.guard import KEY_ENV, parse_keys

    os.environ.pop(KEY_ENV, None)
    source = click.get_current_context().get_parameter_source("api_key")
    where = "--api-key" if source is ParameterSource.COMMANDLINE else f"${KEY_ENV}"
    keys = parse_keys(api_key or "", where)
    if keys and source is ParameterSource.COMMANDLINE:
        ui.warn(f"an API key on the command line is visible to every user of this host (ps); pass it in ${KEY_ENV} or --api-key-file")
    if key_file is not None:
        try:
            if key_file.stat().st_size > 1024**2:
                raise UsageError(f"--api-key-file {key_file}: more than 1 MiB; not a key file")
            text = key_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--api-key-file {key_file}: cannot read it ({getattr(e, 'strerror', None) or type(e).__name__})") from None
        from_file = parse_keys(text, f"--api-key-file {key_file}")
        if not from_file:
            raise UsageError(f"--api-key-file {key_file}: holds no API key")
        keys += from_file
    return keys


if __name__ == "__main__":
    main()
