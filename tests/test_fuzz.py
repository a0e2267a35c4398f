"""A fuzz campaign over everything hxc reads from outside: manifests (real ones,
mutated field by field), .pt2 archives (real ones, mutated), `--input` specs, input
arrays against a signature, and .npy/.npz files. Every case must end in a result or
a documented `HxcError` subclass — never another exception — and, through the CLI, in
one line with a documented exit code.

The default run is quick; `HYPOTHESIS_PROFILE=long` (CI's fuzz job) runs ~20x more cases.
"""

from __future__ import annotations

import copy
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hxc.arrays import read_npy, read_npz
from hxc.compiler.specs import parse_input_spec
from hxc.compiler.pt2_archive import inspect_pt2
from hxc.errors import ExitCode, HxcError
from hxc.manifests.bundle import parse_manifest
from hxc.manifests.schema import Signature, TensorSpec, OutputTree
from hxc.runtime.loader import check_inputs

settings.register_profile("default", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
settings.register_profile("long", max_examples=1500, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

DOCUMENTED_EXIT_CODES = {int(c) for c in ExitCode}

# Values that break readers: wrong types, nulls, paths that leave, huge and negative numbers.
hostile = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
    | st.sampled_from(["", "../x", "/etc/passwd", "a/../../b", "artifacts/\x00", "x" * 5000, "1.0", "99.0", "c128"])
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)  # fmt: skip


def _paths(data: object, prefix: tuple = ()) -> list[tuple]:
    """Every location in a JSON document, as a key/index path."""
    out = [prefix]
    if isinstance(data, dict):
        for k, v in data.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated_manifests(draw, base: dict) -> dict:
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(data) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = data
        for k in path[:-1]:
            parent = parent[k]
        action = draw(st.sampled_from(["replace", "delete", "nest"]))
        if action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif action == "nest":
            parent[path[-1]] = [[[[parent[path[-1]]]]]]
        else:
            parent[path[-1]] = draw(hostile)
    return data


@pytest.fixture(scope="module")
def real_manifest(example_bundle: Path) -> dict:
    return json.loads((example_bundle / "manifest.json").read_text())


def test_manifest_reader_never_crashes(real_manifest):
    @given(mutated_manifests(real_manifest))
    def check(data):
        try:
            parse_manifest(data)
        except HxcError as e:
            assert e.exit_code in DOCUMENTED_EXIT_CODES and "\n" not in str(e)

    check()


def test_the_cli_answers_every_mutated_manifest_in_one_line(real_manifest, example_bundle, tmp_path_factory, cli):
    bundle = tmp_path_factory.mktemp("fuzz") / "b.hxc"
    import shutil

    shutil.copytree(example_bundle, bundle)

    @settings(max_examples=max(10, settings().max_examples // 4))
    @given(mutated_manifests(real_manifest), st.sampled_from(["inspect", "select", "verify"]))
    def check(data, command):
        (bundle / "manifest.json").write_text(json.dumps(data))
        result = cli(command, bundle)
        assert result.exit_code in DOCUMENTED_EXIT_CODES
        if result.exit_code not in (0, ExitCode.MISMATCH, ExitCode.NO_COMPATIBLE_ARTIFACT):
            errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
            assert len(errors) >= 1 and "Traceback" not in result.stderr

    check()


@st.composite
def mutated_archives(draw, base: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(base)) as z:
        entries = {i.filename: z.read(i) for i in z.infolist()}
    name = draw(st.sampled_from(sorted(entries)))
    action = draw(st.sampled_from(["json", "bytes", "drop", "truncate", "add"]))
    if action == "json" and name.endswith(".json"):
        doc = json.loads(entries[name])
        entries[name] = json.dumps(draw(mutated_manifests(doc)) if _paths(doc)[1:] else draw(hostile)).encode()
    elif action == "bytes":
        entries[name] = draw(st.binary(max_size=64))
    elif action == "drop":
        del entries[name]
    elif action == "add":
        root = name.split("/")[0]
        entries[f"{root}/{draw(st.sampled_from(['data/aotinductor/m/x.so', 'data/weights/w.pt', 'version', '../up']))}"] = b"x"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for n, data in entries.items():
            z.writestr(n, data)
    raw = buf.getvalue()
    return raw[: draw(st.integers(0, len(raw)))] if action == "truncate" else raw


def test_archive_reader_never_crashes(models):
    base = models["pt2"].read_bytes()

    @given(mutated_archives(base))
    def check(raw):
        try:
            inspect_pt2(raw, "fuzz.pt2")
        except HxcError as e:
            assert e.exit_code in DOCUMENTED_EXIT_CODES and "\n" not in str(e)

    check()


@given(st.text(max_size=40) | st.from_regex(r"\A(\w+=)?([0-9?]{1,12}x){0,5}[a-z]{1,4}[0-9]{0,3}\Z"))
def test_input_spec_parser_never_crashes(text):
    try:
        spec = parse_input_spec(text)
    except HxcError as e:
        assert e.exit_code == ExitCode.USAGE
    else:
        assert all(isinstance(d, str) or 1 <= d for d in spec.shape)


SIG = Signature(
    inputs=(TensorSpec("x", "f32", ("batch", 3)), TensorSpec("ids", "i64", ("batch",))),
    outputs=(TensorSpec("y", "f32", ("batch", 3)),),
    output_tree=OutputTree("leaf", index=0),
)


@given(st.lists(hnp.arrays(st.sampled_from([np.float32, np.float16, np.int64, np.int32, np.bool_, np.uint8]),
                           hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)), max_size=3))  # fmt: skip
def test_input_checks_never_crash(arrays):
    try:
        checked = check_inputs(SIG, arrays)
    except HxcError as e:
        assert e.exit_code == ExitCode.USAGE
    else:
        assert [a.dtype for a in checked] == [np.float32, np.int64] and checked[0].shape[0] == checked[1].shape[0] > 0


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


@given(hnp.arrays(hnp.scalar_dtypes(), hnp.array_shapes(min_dims=0, max_dims=3, max_side=4)), st.data())
def test_array_reader_round_trips_and_never_crashes_on_damage(a, data):
    raw = _npy(a)
    np.testing.assert_array_equal(read_npy(raw, "x.npy"), a)
    damaged = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        damaged[data.draw(st.integers(0, len(damaged) - 1))] = data.draw(st.integers(0, 255))
    cut = bytes(damaged[: data.draw(st.integers(0, len(damaged)))])
    for reader, blob in ((read_npy, bytes(damaged)), (read_npy, cut), (read_npz, cut)):
        try:
            reader(blob, "x")
        except HxcError as e:
            assert e.exit_code == ExitCode.USAGE


# Fields of a ustar header: (start, end) byte ranges.
_TAR_FIELDS = [(0, 100), (100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (148, 156), (156, 157),
               (157, 257), (257, 263), (263, 265), (345, 500)]  # fmt: skip


@st.composite
def mutated_tars(draw, base: bytes) -> bytes:
    """A real archive with header fields rewritten (checksum fixed up or not), bytes
    flipped, or the file cut short."""
    raw = bytearray(base)
    headers = [0, 1024]  # two one-block members: their headers
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.sampled_from(headers))
        start, end = draw(st.sampled_from(_TAR_FIELDS))
        value = draw(st.binary(max_size=end - start) | st.sampled_from([b"-1", b"-0001000", b"+7", b"1_0", b"77777777777",
                                                                        b"\x80" + b"\xff" * 11, b"../x", b"/etc"]))  # fmt: skip
        raw[at + start : at + end] = value.ljust(end - start, b"\0")[: end - start]
        if draw(st.booleans()):
            raw[at + 148 : at + 156] = b" " * 8
            raw[at + 148 : at + 156] = b"%06o\0 " % sum(raw[at : at + 512])
    return bytes(raw[: draw(st.integers(0, len(raw)))] if draw(st.booleans()) else raw)


def test_archive_header_parser_never_crashes(tmp_path):
    from hxc.manifests.archive import read_index, write_archive

    for name, data in (("a", b"x" * 100), ("b", b"y" * 200)):
        (tmp_path / name).write_bytes(data)
    write_archive(tmp_path / "t.hxcb", [("a", tmp_path / "a"), ("b", tmp_path / "b")])
    base = (tmp_path / "t.hxcb").read_bytes()

    @settings(max_examples=settings().max_examples * 5)
    @given(mutated_tars(base))
    def check(raw):
        try:
            members = read_index(io.BytesIO(raw), len(raw), "t.hxcb")
        except HxcError as e:
            assert e.exit_code == ExitCode.INTEGRITY and "\n" not in str(e)
            return
        for m in members.values():  # whatever is accepted lies inside the file
            assert 0 <= m.offset and m.offset + m.size <= len(raw) and m.offset % 512 == 0

    check()
