"""The manifest schema: typed round trips, type checking on read, and a checked-in
copy of the schema that fails the build when the two drift apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hxc.errors import BundleError
from hxc.manifests import read_manifest
from hxc.manifests.bundle import parse_manifest
from hxc.manifests.schema import SCHEMA_VERSION, Manifest, from_json, schema_description, to_json

CHECKED_IN = Path(__file__).parent / "data" / "manifest_schema.json"


def test_schema_matches_the_checked_in_copy():
    """If this fails you changed a manifest record. Adding a field with a default is a
    minor change; renaming, removing or retyping one is a major change. Bump
    SCHEMA_VERSION in hxc/manifests/schema.py accordingly, then regenerate the copy:
    python -c "import json; from hxc.manifests.schema import schema_description as d; print(json.dumps(d(), indent=2))" > tests/data/manifest_schema.json
    """
    assert schema_description() == json.loads(CHECKED_IN.read_text())


def test_round_trip_is_exact(example_bundle):
    m = read_manifest(example_bundle)
    again = from_json(Manifest, json.loads(json.dumps(to_json(m))))
    assert again == m


def test_wrong_types_and_missing_fields_are_named(example_bundle):
    data = json.loads((example_bundle / "manifest.json").read_text())
    data["artifacts"][0]["size"] = "big"
    with pytest.raises(BundleError, match=r"manifest\.artifacts\[0\]\.size"):
        parse_manifest(data)
    del data["functions"]["main"]["signature"]
    with pytest.raises(BundleError, match="missing field 'signature'"):
        parse_manifest(data)
    del data["functions"]
    with pytest.raises(BundleError, match="missing field 'functions'"):
        parse_manifest(data)


def test_newer_minor_fields_are_ignored_older_readers_keep_working(example_bundle):
    data = json.loads((example_bundle / "manifest.json").read_text())
    data["schema_version"] = f"{SCHEMA_VERSION[0]}.{SCHEMA_VERSION[1] + 1}"
    data["some_future_field"] = {"x": 1}
    assert parse_manifest(data).model.name == "convnet"


@pytest.mark.parametrize("text", ["not json", json.dumps({"format": "something-else"}), json.dumps([1, 2])])
def test_not_a_manifest(tmp_path, text):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(BundleError):
        read_manifest(tmp_path)


def test_writing_files_never_changes_the_process_umask(tmp_path, monkeypatch):
    # Compile threads write while other threads create files: setting the umask to 0,
    # even briefly, would create those world-writable.
    import os

    from hxc.manifests.bundle import atomic_write, staged_bundle

    umask = os.umask(0o022)
    os.umask(umask)

    def refuse(mask: int) -> int:
        raise AssertionError(f"os.umask({mask:o}) called while writing")

    monkeypatch.setattr(os, "umask", refuse)
    atomic_write(tmp_path / "a.json", b"{}")
    with staged_bundle(tmp_path / "b.hxc") as stage:
        (stage / "manifest.json").write_text("{}")
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "b.hxc").stat().st_mode & 0o777 == 0o777 & ~umask


def test_a_2x_bundle_still_reads_with_the_defaults_it_meant(example_bundle):
    """3.0 added fields a 2.x reader would misread; their defaults are exactly what a
    2.x bundle meant (every artifact IREE's, no interface casts, no Vulkan features)."""
    data = json.loads((example_bundle / "manifest.json").read_text())
    data["schema_version"] = "2.0"
    for a in data["artifacts"]:
        for field in ("engine", "interface_casts"):
            a.pop(field, None)
        a.get("requires", {}).pop("vulkan_features", None)
    m = parse_manifest(data)
    assert {a.engine for a in m.artifacts} == {"iree"}
    assert all(not a.interface_casts and not a.requires.vulkan_features for a in m.artifacts)


def test_profiles_keep_their_own_version_so_older_readers_can_read_them(example_bundle):
    """A newer hxc bench writing profiles into a bundle must not make the profiles
    unreadable to the hxc that built it: profiles.json is versioned apart from the manifest."""
    from hxc.manifests.bundle import parse_profiles
    from hxc.manifests.schema import PROFILES_SCHEMA_VERSION

    data = {"format": "hxc-profiles", "model_ir_sha256": "x", "hosts": [], "profiles": []}
    data["schema_version"] = f"{PROFILES_SCHEMA_VERSION[0]}.{PROFILES_SCHEMA_VERSION[1]}"
    assert parse_profiles(data, "profiles.json").profiles == ()
    data["schema_version"] = f"{PROFILES_SCHEMA_VERSION[0] + 1}.0"
    with pytest.raises(BundleError, match="newer than this hxc reads"):
        parse_profiles(data, "profiles.json")
