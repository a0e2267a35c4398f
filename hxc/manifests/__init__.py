"""The bundle format: manifest schema, layout constants, and safe reading/writing."""

from hxc.manifests.bundle import read_manifest, staged_bundle, update_manifest, write_manifest
from hxc.manifests.schema import (
    ARTIFACTS_DIR,
    GOLDEN_FILE,
    MANIFEST_FILE,
    SCHEMA_VERSION,
    Artifact,
    Manifest,
    ModelInfo,
    OutputTree,
    Requirements,
    Signature,
    TensorSpec,
    Toolchain,
)

__all__ = [
    "ARTIFACTS_DIR",
    "GOLDEN_FILE",
    "MANIFEST_FILE",
    "SCHEMA_VERSION",
    "Artifact",
    "Manifest",
    "ModelInfo",
    "OutputTree",
    "Requirements",
    "Signature",
    "TensorSpec",
    "Toolchain",
    "read_manifest",
    "staged_bundle",
    "update_manifest",
    "write_manifest",
]
