"""`hxc bench --fail-if-slower-than BASELINE`: did the fastest artifact keep up with the
baseline in single-stream latency, within a margin? The verdict knows its exit code."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hxc.bench.baselines import Baseline
from hxc.errors import ExitCode, NoCompatibleArtifactError, UsageError
from hxc.manifests.schema import Profile


@dataclass(frozen=True)
class GateVerdict:
    baseline: str  # the baseline's candidate id
    best: str  # the fastest artifact
    best_p50_ms: float
    baseline_p50_ms: float
    ratio: float  # best / baseline p50: below 1 is faster than the baseline
    margin: float  # tolerated slowdown: passes while ratio <= 1 + margin
    passed: bool

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.OK if self.passed else ExitCode.REGRESSION

    @property
    def message(self) -> str:
        return (f"{self.best} p50 {self.best_p50_ms:.3g} ms vs {self.baseline} {self.baseline_p50_ms:.3g} ms "
                f"({self.ratio:.2f}x the baseline's time, allowed {1 + self.margin:.2f}x)")  # fmt: skip


def judge(profiles: Sequence[Profile], baseline: Baseline, margin: float) -> GateVerdict:
    single = [p for p in profiles if p.scenario == "single-stream"]
    base = next((p for p in single if p.candidate == baseline.candidate), None)
    if base is None:
        raise UsageError(f"--fail-if-slower-than {baseline.name}: that baseline was not measured",
                         hint=f"add --baseline {baseline.name}")  # fmt: skip
    artifacts = [p for p in single if p.artifact_sha256 is not None]
    if not artifacts:
        raise NoCompatibleArtifactError("--fail-if-slower-than: no artifact was measured")
    best = min(artifacts, key=lambda p: p.latency.p50_ms)
    ratio = best.latency.p50_ms / base.latency.p50_ms
    return GateVerdict(baseline.candidate, best.candidate, best.latency.p50_ms, base.latency.p50_ms, round(ratio, 4),
                       margin, ratio <= 1 + margin)  # fmt: skip
