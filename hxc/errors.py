"""Expected failures, each with a one-line message and its own exit code.

Anything that is a user's mistake or an environment problem raises an `HxcError`;
the CLI prints its message on one line and exits with its code. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1  # a failure with no more specific code
    USAGE = 2  # bad command line: unknown target, malformed --input (click uses 2 too)
    PARTIAL = 3  # some targets failed to compile; nothing was written
    NO_COMPATIBLE_ARTIFACT = 4  # nothing in the bundle can run on this host
    INTEGRITY = 5  # an artifact's bytes do not match the manifest
    MISMATCH = 6  # an artifact's numbers disagree with the golden sample
    REGRESSION = 7  # a bench gate failed (slower than the named baseline)


class HxcError(Exception):
    """An expected failure: one line for the user, plus an optional hint."""

    exit_code: ExitCode = ExitCode.ERROR

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class UsageError(HxcError):
    exit_code = ExitCode.USAGE


class ModelLoadError(HxcError):
    """The model file is missing, unreadable, or not a format hxc understands."""


class LoweringError(HxcError):
    """The model loaded but could not be exported or converted to IREE's input IR."""


class BundleError(HxcError):
    """The bundle is missing, malformed, or from an incompatible schema."""


class IntegrityError(BundleError):
    exit_code = ExitCode.INTEGRITY


class NoCompatibleArtifactError(HxcError):
    exit_code = ExitCode.NO_COMPATIBLE_ARTIFACT


class PlacementError(HxcError):
    """No placement of a staged model's stages fits the devices' memory (or the one forced does not)."""

    exit_code = ExitCode.NO_COMPATIBLE_ARTIFACT


class NothingToCompareError(HxcError):
    """`hxc verify` on a bundle whose golden sample has no expected outputs."""


class SignatureError(HxcError, ValueError):
    """Inputs given to a loaded model do not match its recorded signature."""

    exit_code = ExitCode.USAGE


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's text, for one-line messages."""
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:limit]
