"""Combining benchmark profiles: from one run into its bundle, or from bundles copied
back from other machines (CI runners with different hardware) into one."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hxc.manifests.bundle import ProfilesFile, read_manifest, read_profiles_file, update_manifest
from hxc.manifests.schema import Host, Manifest, Profile


def add_profiles(m: Manifest, hosts: Sequence[Host], profiles: Sequence[Profile]) -> Manifest:
    """The manifest with these hosts and profiles added; identical entries are kept once."""
    known_hosts = {h.id: h for h in m.hosts}
    for h in hosts:
        known_hosts.setdefault(h.id, h)
    seen = {_key(p) for p in m.profiles}
    new = []
    for p in profiles:
        if _key(p) not in seen:
            seen.add(_key(p))
            new.append(p)
    return dataclasses.replace(m, hosts=tuple(known_hosts.values()), profiles=(*m.profiles, *new))


def _key(p: Profile) -> tuple:
    return (p.host_id, p.candidate, p.artifact_sha256, p.device, p.scenario, p.batch, p.recorded, p.latency.p50_ms)


@dataclass
class MergeResult:
    added: int
    skipped: list[str]  # why some profiles were not taken
    hosts: int


def merge_profiles(bundle: str | Path, sources: Sequence[str | Path]) -> MergeResult:
    """Merge profiles from other copies of this bundle (a bundle directory or its
    profiles.json) into `bundle`. Only profiles of the same model, and of artifacts
    with the same sha256 (or baselines), are taken: a profile of different bytes says
    nothing about these."""
    target = read_manifest(bundle)
    mine = {a.sha256 for a in target.ok_artifacts}
    hosts: list[Host] = []
    profiles: list[Profile] = []
    skipped: list[str] = []
    for src in sources:
        other = _read_any(Path(src))
        if other.model_ir_sha256 != target.model.ir_sha256:
            skipped.append(f"{src}: measured for a different model (IR sha256 differs)")
            continue
        for p in other.profiles:
            if p.artifact_sha256 is not None and p.artifact_sha256 not in mine:
                skipped.append(f"{src}: {p.candidate} profile is for other bytes than this bundle's artifact")
                continue
            profiles.append(p)
        measured = {p.host_id for p in other.profiles}  # a set: a list made this hosts x profiles
        hosts += [h for h in other.hosts if h.id in measured]

    before = len(target.profiles)
    updated = update_manifest(bundle, lambda m: add_profiles(m, hosts, profiles))
    return MergeResult(len(updated.profiles) - before, skipped, len(updated.hosts))


def _read_any(path: Path) -> ProfilesFile:
    if path.is_dir():
        m = read_manifest(path)
        return ProfilesFile(m.model.ir_sha256, m.hosts, m.profiles)
    return read_profiles_file(path)
