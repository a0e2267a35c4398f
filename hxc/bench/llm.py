"""`hxc bench` on a language-model bundle: per artifact and device, the time to the
first token of a 32-, 128- and 512-token prompt (prefill tokens per second follow from
it), and the time per output token at batch 1 and, when the bundle's cache holds
several sequences, at the largest batch it holds (every slot stepped by one decode
call); each recorded as a profile whose `generation` says which, with the artifact's
memory (its weights' bytes and the KV cache's bytes per token).

Each is a call timed many times, as `hxc bench` times any model (a worker process per
device, interleaved blocks; `hxc.bench.measure`), on a KV cache allocated once on the
device: a prefill call is `generate(prompt, max_new_tokens=1)` from token ids (the
prompt's chunks through `prefill`, the first token chosen: what a user waits for,
tokenising aside); a decode call is one `decode` step of `batch` sequences and their
greedy choices, stepping through the positions after the prompt so the timings cover a
generation's length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hxc.bench.contenders import artifact_contenders
from hxc.bench.measure import Contender
from hxc.manifests.bundle import read_bundle, trust_policy
from hxc.manifests.schema import GenerationTiming, LanguageModel, Manifest
from hxc.manifests.signing import TrustPolicy
from hxc.runtime.probe import probe_host

PROMPT_TOKENS = (32, 128, 512)  # time to first token is measured at these prompt lengths (where the context holds them)
DECODE_AFTER = 32  # decode steps are timed after a prompt of this many tokens ...
DECODE_SPAN = 64  # ... at the positions of the next this many tokens, in turn


@dataclass(frozen=True)
class Case:
    """One thing to time: `timing` (which phase, after which prompt) over `batch`
    sequences at once (decode only: prefill runs one prompt per call)."""

    timing: GenerationTiming
    batch: int = 1

    @property
    def scenario(self) -> Literal["single-stream", "offline"]:
        return "single-stream" if self.batch == 1 else "offline"

    @property
    def inputs(self) -> list:
        """What a worker process prepares the timed call from."""
        return [self.timing.phase, self.timing.prompt_tokens, self.batch]


def cases(lm: LanguageModel) -> list[Case]:
    """What to time on this model: prefill at each prompt length its context holds (with
    room for a token after it), then decode at batch 1 and at every slot the cache holds."""
    out = [Case(GenerationTiming("prefill", n)) for n in PROMPT_TOKENS if n < lm.max_context]
    if DECODE_AFTER < lm.max_context:
        out += [Case(GenerationTiming("decode", DECODE_AFTER), b) for b in sorted({1, lm.slots})]
    return out


def with_memory(timing: GenerationTiming, manifest: Manifest, artifact_id: str) -> GenerationTiming:
    """`timing` with the artifact's memory: the bytes of the weights it reads (its
    precision's parameter archive, else its own file, which then holds them; a staged
    bundle's chain, `cpu:host`: every stage's) and the KV cache's bytes per token of context."""
    from dataclasses import replace

    assert manifest.language_model is not None
    arts = ([a for a in manifest.artifacts if a.id == artifact_id]
            or [a for a in manifest.artifacts if a.stage is not None and a.target_id == artifact_id])  # fmt: skip
    if not arts:
        raise KeyError(artifact_id)
    size = 0
    for art in arts:
        weights = manifest.weights_for(art.precision, art.stage)
        size += weights.size if weights is not None else art.size or 0
    return replace(timing, weights_bytes=size, kv_bytes_per_token=manifest.language_model.kv_bytes_per_token)


def llm_contenders(bundle: Path, device: str | None = None, only: tuple[str, ...] | None = None,
                   trust: TrustPolicy | None = None) -> list[Contender]:  # fmt: skip
    """One contender per artifact this host can run (on `device`, if given); `only`
    keeps the named ones (a worker process's share). The inputs each is prepared with
    are a case's `inputs`: [phase, prompt_tokens, batch]."""
    trust = trust if trust is not None else trust_policy()
    manifest = read_bundle(bundle, trust).manifest
    out = artifact_contenders(bundle, manifest, probe_host(), device, trust, call=_call)
    return out if only is None else [c for c in out if c.id in only]


def _prompt(lm: LanguageModel, n: int, offset: int = 0) -> list[int]:
    # Ids spread over the vocabulary, past the special tokens at its start: the cost of a
    # step does not depend on which tokens they are (`offset` makes each slot's its own).
    return [int(t) for t in 3 + (np.arange(offset, offset + n) * 7919) % max(lm.vocab_size - 3, 1)]


def _call(model: Any, inputs: list) -> Callable[[], None]:
    from hxc.runtime.generate import decode_batch, generate, language_model_of, prefill

    phase, prompt_tokens, batch = inputs
    lm = language_model_of(model)
    state = model.new_state()
    if phase == "prefill":
        ids = _prompt(lm, int(prompt_tokens))
        return lambda: generate(model, ids, 1, stop_token_ids=[], state=state).result()
    slots = range(int(batch))
    start = int(prompt_tokens)
    end = min(start + DECODE_SPAN, lm.max_context)
    tokens = {s: int(np.argmax(prefill(model, lm, _prompt(lm, start, 101 * s), state, slot=s))) for s in slots}
    step = {"position": start}

    def one_token_each() -> None:
        logits = decode_batch(model, lm, {s: (tokens[s], step["position"]) for s in slots}, state)
        for s in slots:
            tokens[s] = int(np.argmax(logits[s]))
        step["position"] = step["position"] + 1 if step["position"] + 1 < end else start

    return one_token_each
