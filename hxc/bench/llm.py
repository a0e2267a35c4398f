"""`hxc bench` on a language-model bundle: per artifact and device, the time to the
first token of a 32- and a 128-token prompt, and the time per output token at batch 1
(decode tokens per second is its inverse), recorded as profiles whose `generation`
says which.

Each is a call timed many times, as `hxc bench` times any model (a worker process per
device, interleaved blocks; `hxc.bench.measure`), on a KV cache allocated once on the
device: a prefill call is `generate(prompt, max_new_tokens=1)` from token ids (the
prompt's chunks through `prefill`, the first token chosen: what a user waits for,
tokenising aside); a decode call is one `decode` step and its greedy choice, stepping
through the positions after the prompt so the timings cover a generation's length.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hxc.bench.contenders import artifact_contenders
from hxc.bench.measure import Contender
from hxc.manifests.bundle import read_bundle, trust_policy
from hxc.manifests.schema import GenerationTiming, LanguageModel
from hxc.manifests.signing import TrustPolicy
from hxc.runtime.probe import probe_host

PROMPT_TOKENS = (32, 128)  # time to first token is measured at these prompt lengths (where the context holds them)
DECODE_AFTER = 32  # decode steps are timed after a prompt of this many tokens ...
DECODE_SPAN = 64  # ... at the positions of the next this many tokens, in turn


def cases(lm: LanguageModel) -> list[GenerationTiming]:
    """What to time on this model: prefill at each prompt length its context holds (with
    room for a token after it), then decode."""
    out = [GenerationTiming("prefill", n) for n in PROMPT_TOKENS if n < lm.max_context]
    if DECODE_AFTER < lm.max_context:
        out.append(GenerationTiming("decode", DECODE_AFTER))
    return out


def llm_contenders(bundle: Path, device: str | None = None, only: tuple[str, ...] | None = None,
                   trust: TrustPolicy | None = None) -> list[Contender]:  # fmt: skip
    """One contender per artifact this host can run (on `device`, if given); `only`
    keeps the named ones (a worker process's share). The inputs each is prepared with
    are a case's fields: [phase, prompt_tokens]."""
    trust = trust if trust is not None else trust_policy()
    manifest = read_bundle(bundle, trust).manifest
    out = artifact_contenders(bundle, manifest, probe_host(), device, trust, call=_call)
    return out if only is None else [c for c in out if c.id in only]


def _prompt(lm: LanguageModel, n: int) -> list[int]:
    # Ids spread over the vocabulary, past the special tokens at its start: the cost of a
    # step does not depend on which tokens they are.
    return [int(t) for t in 3 + (np.arange(n) * 7919) % max(lm.vocab_size - 3, 1)]


def _call(model: Any, inputs: list) -> Callable[[], None]:
    from hxc.runtime.generate import decode, generate, language_model_of, prefill

    phase, prompt_tokens = inputs
    lm = language_model_of(model)
    state = model.new_state()
    ids = _prompt(lm, int(prompt_tokens))
    if phase == "prefill":
        return lambda: generate(model, ids, 1, stop_token_ids=[], state=state).result()
    token = int(np.argmax(prefill(model, lm, ids, state)))
    end = min(len(ids) + DECODE_SPAN, lm.max_context)
    step = {"position": len(ids), "token": token}

    def one_token() -> None:
        logits = decode(model, lm, step["token"], step["position"], state)
        step["token"] = int(np.argmax(logits))
        step["position"] = step["position"] + 1 if step["position"] + 1 < end else len(ids)

    return one_token
