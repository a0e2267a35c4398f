"""Faults and bad input end cleanly: `hxc compile` killed (SIGKILL, SIGTERM) at any
instant, two compiles to one path, a full disk, an unusable cache, and malformed
manifests, specs and arrays. Afterwards the output path holds a complete bundle that
passes `hxc verify` (the old one or the new one), nothing is left behind after the
next run, no iree-compile child survives, and every error is one line."""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import hxc.runtime
from hxc.errors import BundleError, ExitCode
from hxc.verify import verify_bundle

HXC = [sys.executable, "-m", "hxc.cli"]


def _hxc(*args: object, env: dict | None = None, **kw) -> subprocess.Popen:
    full_env = {**os.environ, **(env or {})}
    return subprocess.Popen([*HXC, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env, **kw)  # fmt: skip


def _compile_args(models: dict[str, Path], out: Path, cache: Path) -> list[object]:
    # Several targets and no cache hits, so there is a long window of running children.
    return ["compile", models["pt2"], "-t", "cpu:host,cpu:x86-64-v3,vulkan", "-o", out, "--cache-dir", cache, "--no-cache"]


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))


def _children_of_tree_alive(marker: str) -> list[str]:
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if marker in line and "iree-compile" in line]


@pytest.fixture
def old_bundle(example_bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "work" / "model.hxc"
    out.parent.mkdir()
    shutil.copytree(example_bundle, out)
    return out


def _assert_whole_bundle(out: Path) -> None:
    assert (out / "manifest.json").is_file(), f"{out} holds no bundle"
    report = verify_bundle(out)
    assert not report.integrity and report.ok, report


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_compile_leaves_a_whole_bundle_and_no_children(old_bundle, models, tmp_path, sig):
    rng = random.Random(sig)
    for attempt in range(2):
        proc = _hxc(*_compile_args(models, old_bundle, tmp_path / "cache"))
        # Somewhere between start-up, import and the parallel compiles.
        time.sleep(rng.uniform(1.0, 6.0))
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        if sig == signal.SIGTERM and proc.returncode not in (0, -signal.SIGTERM):  # -15: before any work began
            assert proc.returncode == 128 + signal.SIGTERM and "terminated" in err and "Traceback" not in err
        time.sleep(0.5)  # let the kernel deliver PDEATHSIG
        assert not _children_of_tree_alive(str(old_bundle.parent)), "an iree-compile child outlived hxc"
        _assert_whole_bundle(old_bundle)
    # The next run cleans up whatever the killed ones left and publishes its bundle.
    done = _hxc(*_compile_args(models, old_bundle, tmp_path / "cache"))
    _, err = done.communicate(timeout=600)
    assert done.returncode == 0, err
    assert _leftovers(old_bundle) == []
    _assert_whole_bundle(old_bundle)


@pytest.mark.parametrize("point", ["before-swap", "after-swap"])
def test_a_kill_during_the_swap_leaves_the_old_or_the_new_bundle(old_bundle, models, tmp_path, point):
    before = json.loads((old_bundle / "manifest.json").read_text())["created"]
    proc = _hxc("compile", models["pt2"], "-t", "cpu:host", "-o", old_bundle, "--cache-dir", tmp_path / "c",
                env={"HXC_FAULT": point})  # fmt: skip
    proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL
    _assert_whole_bundle(old_bundle)
    now = json.loads((old_bundle / "manifest.json").read_text())
    assert (now["created"] == before) == (point == "before-swap")  # old before, new after
    assert _leftovers(old_bundle)  # the killed run could not clean up...
    again = _hxc("compile", models["pt2"], "-t", "cpu:host", "-o", old_bundle, "--cache-dir", tmp_path / "c")
    assert again.wait(timeout=600) == 0
    assert _leftovers(old_bundle) == []  # ...the next one did
    _assert_whole_bundle(old_bundle)


def test_two_concurrent_compiles_to_one_path(models, tmp_path):
    out = tmp_path / "both.hxc"
    a = _hxc("compile", models["pt2"], "-t", "cpu:host", "-o", out, "--cache-dir", tmp_path / "c1")
    b = _hxc("compile", f"{models['factory']}:make_model", "-t", "cpu:host", "-o", out, "--cache-dir", tmp_path / "c2")
    results = [p.communicate(timeout=600) for p in (a, b)]
    assert a.returncode == 0 and b.returncode == 0, results
    _assert_whole_bundle(out)
    assert _leftovers(out) == []


def test_a_full_disk_is_one_line_and_keeps_the_old_bundle(old_bundle, models, tmp_path):
    # RLIMIT_FSIZE makes every write past 40 KiB fail (EFBIG in hxc, SIGXFSZ in its
    # children): the same code paths as ENOSPC, on any machine, without root.
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (40 * 1024, 40 * 1024))

    proc = _hxc(*_compile_args(models, old_bundle, tmp_path / "cache"), preexec_fn=limit)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode not in (0, None) and proc.returncode > 0
    lines = [line for line in err.strip().splitlines() if line.startswith("error")]
    assert lines and "Traceback" not in err, err
    _assert_whole_bundle(old_bundle)
    again = _hxc("compile", models["pt2"], "-t", "cpu:host", "-o", old_bundle, "--cache-dir", tmp_path / "c")
    assert again.wait(timeout=600) == 0 and _leftovers(old_bundle) == []


def test_a_full_disk_while_the_program_archive_is_written(old_bundle, models, tmp_path):
    # A limit below the program archive's size (program.pt2, about the size of the model
    # file) but above the IR's: the first write to fail is torch's archive writer, whose
    # C++ destructor used to throw and abort the process (exit 134, no message).
    size = models["pt2"].stat().st_size // 2

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    proc = _hxc("compile", models["pt2"], "-t", "cpu:host", "-o", old_bundle, "--cache-dir", tmp_path / "c",
                "--no-cache", preexec_fn=limit)  # fmt: skip
    _, err = proc.communicate(timeout=600)
    lines = [line for line in err.strip().splitlines() if line.startswith("error")]
    assert proc.returncode == ExitCode.ERROR, err
    assert len(lines) == 1 and "program.pt2: File too large" in lines[0] and "Traceback" not in err, err
    _assert_whole_bundle(old_bundle)
    assert _leftovers(old_bundle) == []


def test_a_real_full_file_system(models, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a small tmpfs here (the RLIMIT_FSIZE test covers the same paths)")
    try:
        proc = _hxc("compile", models["pt2"], "-t", "cpu:host", "-o", mnt / "m.hxc", "--cache-dir", tmp_path / "c")
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == ExitCode.ERROR and "No space left on device" in err and "Traceback" not in err
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)])


@pytest.mark.parametrize("kind", ["file", "full"])
def test_an_unusable_cache_only_warns(models, tmp_path, cli, caplog, kind):
    cache = tmp_path / "cache"
    if kind == "file":
        cache.write_text("not a directory")
    else:
        cache.mkdir()
        (cache / "compile").write_text("")  # a file where the cache's subdirectory goes
        (cache / "import").write_text("")
    result = cli("compile", models["pt2"], "-t", "cpu:host", "-o", tmp_path / "m.hxc", "--cache-dir", cache)
    assert result.exit_code == 0, result.stderr
    assert "continuing without it" in caplog.text
    _assert_whole_bundle(tmp_path / "m.hxc")


@pytest.mark.parametrize("spec, words", [
    ("99999999999x3xf32", "dimension 0 is 99999999999"),
    ("0x3xf32", "dimension 0 is 0"),
    ("65536x65536x65536xf32", "would not fit in memory"),
])  # fmt: skip
def test_bad_input_specs_are_usage_errors(models, tmp_path, cli, spec, words):
    result = cli("compile", f"{models['factory']}:bare_module", "--input", spec, "-o", tmp_path / "m.hxc")
    assert result.exit_code == ExitCode.USAGE and words in result.stderr and "Traceback" not in result.stderr


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


@pytest.mark.parametrize("mutate, words", [
    (lambda d: d["functions"]["main"]["signature"]["inputs"][0].update(dtype="c128"), "unknown dtype 'c128'"),
    (lambda d: d["functions"]["main"]["signature"].update(output_tree={"kind": "tuple", "items": []}), "exactly once"),
    (lambda d: d["functions"]["main"]["signature"].update(output_tree={"kind": "leaf", "index": 7}), "exactly once"),
    (lambda d: d["artifacts"][0].update(file=None), "names no file"),
    (lambda d: d["artifacts"][0].pop("status"), "missing field 'status'"),
])  # fmt: skip
def test_malformed_manifests_are_one_line_bundle_errors(old_bundle, cli, mutate, words):
    data = _manifest(old_bundle)
    mutate(data)
    (old_bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=words):
        hxc.runtime.load(old_bundle)
    result = cli("verify", old_bundle)
    assert result.exit_code == ExitCode.ERROR and "Traceback" not in result.stderr


def test_deeply_nested_json_is_refused(old_bundle, cli):
    (old_bundle / "manifest.json").write_text('{"format": "hxc-bundle", "x": ' + "[" * 200_000 + "]" * 200_000 + "}")
    result = cli("inspect", old_bundle)
    assert result.exit_code == ExitCode.ERROR and "nested too deeply" in result.stderr


def test_a_truncated_golden_sample(old_bundle, cli):
    golden = old_bundle / "golden.npz"
    golden.write_bytes(golden.read_bytes()[:100])
    assert cli("verify", old_bundle).exit_code == ExitCode.INTEGRITY


@pytest.mark.parametrize("device", ["cpu", "vulkan"])
def test_an_empty_batch_gives_an_empty_result_on_either_device(models, reference, tmp_path, device):
    # The CPU computes it; Vulkan cannot dispatch over empty buffers, and the loader
    # answers from the output's shape instead (more in test_zero_size.py).
    from hxc.build import build_bundle

    out = tmp_path / "dyn.hxc"
    build_bundle(str(models["pt2_dynamic"]), out, "cpu:host,vulkan")
    model = hxc.runtime.load(out, device=device, strict=True)
    x = np.zeros((0, 3, 8, 8), np.float32)
    y = model(x)
    with torch.no_grad():
        expected = reference.make_model()[0](torch.from_numpy(x)).numpy()
    assert y.shape == expected.shape == (0, 5) and y.dtype == np.float32


def _with_crashing_code(bundle: Path, artifact_id: str) -> None:
    """Overwrite the executable code inside an artifact's embedded ELF with `ud2`
    (an illegal instruction), then record the new hash: a valid-looking, validly
    hashed artifact whose code crashes the process that runs it."""
    import dataclasses
    import struct

    from hxc.manifests import read_manifest, write_manifest
    from hxc.manifests.bundle import file_hash

    m = read_manifest(bundle)
    art = m.artifact(artifact_id)
    path = bundle / art.file
    data = bytearray(path.read_bytes())
    elf = data.index(b"\x7fELF\x02\x01")
    shoff, = struct.unpack_from("<Q", data, elf + 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, elf + 0x3A)
    patched = 0
    for i in range(shnum):
        base = elf + shoff + i * shentsize
        _, _, flags, _, offset, size = struct.unpack_from("<IIQQQQ", data, base)
        if flags & 0x4 and size:  # SHF_EXECINSTR
            data[elf + offset : elf + offset + size] = b"\x0f\x0b" * (size // 2) + b"\x90" * (size % 2)
            patched += size
    assert patched
    path.write_bytes(bytes(data))
    arts = tuple(dataclasses.replace(a, sha256=file_hash(path).sha256) if a.id == artifact_id else a for a in m.artifacts)
    write_manifest(bundle, dataclasses.replace(m, artifacts=arts, files={**m.files, art.file: file_hash(path)}))


def test_an_artifact_that_crashes_in_iree_does_not_take_hxc_down(old_bundle, cli, tmp_path):
    _with_crashing_code(old_bundle, "cpu:host")
    result = cli("verify", old_bundle, "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == ExitCode.MISMATCH
    crashed = next(r for r in report["results"] if r["artifact"] == "cpu:host")
    assert not crashed["ok"] and "crashed (SIGILL)" in crashed["error"]
    assert all(r["ok"] for r in report["results"] if r["artifact"] != "cpu:host")  # the others still checked
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 32, 32), np.float32))
    ran = cli("run", old_bundle, "-i", tmp_path / "x.npy", "--device", "cpu:host")
    assert ran.exit_code == ExitCode.ERROR and "crashed (SIGILL)" in ran.stderr and "Traceback" not in ran.stderr
    # What isolation prevents: in the caller's own process the same call kills it.
    direct = _hxc("run", old_bundle, "-i", tmp_path / "x.npy", "--device", "cpu:host", "--in-process")
    direct.communicate(timeout=300)
    assert direct.returncode == -signal.SIGILL
