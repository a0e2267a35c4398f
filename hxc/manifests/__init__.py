"""The bundle format: manifest schema, layout constants, and safe reading/writing."""

from typing import Any

from hxc.manifests.schema import (
    ARTIFACTS_DIR,
    GOLDEN_FILE,
    MAIN,
    MANIFEST_FILE,
    SCHEMA_VERSION,
    Artifact,
    FunctionSpec,
    Manifest,
    ModelInfo,
    OutputTree,
    Requirements,
    Signature,
    StateSpec,
    TensorSpec,
    Toolchain,
)

__all__ = [
    "ARTIFACTS_DIR",
    "GOLDEN_FILE",
    "MAIN",
    "MANIFEST_FILE",
    "SCHEMA_VERSION",
    "Artifact",
    "FunctionSpec",
    "Manifest",
    "ModelInfo",
    "OutputTree",
    "Requirements",
    "Signature",
    "StateSpec",
    "TensorSpec",
    "Toolchain",
    "read_manifest",
    "staged_bundle",
    "update_manifest",
    "write_manifest",
]

_FROM_BUNDLE = ("read_manifest", "staged_bundle", "update_manifest", "write_manifest")


def __getattr__(name: str) -> Any:
    # Reading and writing bundles needs much more of the standard library than the
    # records do, and `hxc --help` needs only the records: bundle.py loads on first use.
    if name in _FROM_BUNDLE:
        from hxc.manifests import bundle

        return getattr(bundle, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
