"""Continuous batching on one device: many sequences of one language model share its
KV cache, one sequence per slot, and every decode step runs all of them in one call.

    batch = Batch(model)                                   # one ModelState, `lm.slots` slots
    batch.add("a", ids_a, max_new_tokens=32)               # takes a free slot
    batch.add("b", ids_b, max_new_tokens=8, sampling=Sampling(0.8, seed=1))
    while not batch.idle:
        for event in batch.step():                         # Event(id, token, finish)
            ...
    batch.cancel("a")                                      # frees its slot at once

A step does two things (as llama.cpp's server and vLLM's scheduler do):
1. one prefill chunk of the oldest sequence still reading its prompt (a long prompt
   takes one chunk per step, so it never stalls the others for more than a chunk);
   when its prompt is done, its first token is chosen from the chunk's logits;
2. one decode step for every sequence that has a token to extend: tokens[slots] and
   positions[slots], idle slots at the scratch position.
While others decode, both are one `mixed` call (bundles of several slots have it: the
smallest chunk rides in the decode call, as in vLLM's mixed batches, so the weights are
read once a step, not twice); otherwise a `prefill` call (alone: the largest chunk the
prompt fills), then a `decode` call that includes the sequence just prefilled.
A sequence that ends (an end-of-sequence token, `max_new_tokens`, or a full context)
frees its slot in the same step; the next `add` may take it before the next step.

Each sequence chooses its tokens exactly as `generate` does (the same `Sampling`, a
generator seeded the same way, the same stopping rules), so its tokens are
`generate`'s whatever slot it runs in and whoever shares the step with it. The KV
cache is never cleared: a new sequence's prefill writes positions 0..n-1 of its
slot, and attention reads only the positions a sequence has written.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from hxc.errors import UsageError
from hxc.lm_calls import next_chunk
from hxc.runtime.generate import Sampling, decode_batch, has_mixed, language_model_of, mixed_step, prefill_chunk

if TYPE_CHECKING:
    from hxc.runtime.loader import LoadedModel, ModelState


@dataclass(frozen=True)
class Event:
    """A token chosen for sequence `id`; `finish` is "stop" (an end-of-sequence token)
    or "length" (max_new_tokens, or the context is full) when it was the last."""

    id: Hashable
    token: int
    finish: str | None = None


@dataclass(eq=False)
class _Sequence:
    id: Hashable
    ids: list[int]  # the prompt
    max_new_tokens: int
    sampling: Sampling
    stop_ids: frozenset[int]
    slot: int
    rng: np.random.Generator
    filled: int = 0  # prompt tokens in the cache
    out: list[int] = field(default_factory=list)

    @property
    def prefilling(self) -> bool:
        return self.filled < len(self.ids)


class Batch:
    """The sequences running on one loaded language model: one `ModelState` (its KV
    cache), `lm.slots` sequences at most. Not thread-safe: one thread adds, steps and
    cancels (a server's device worker)."""

    def __init__(self, model: LoadedModel, state: ModelState | None = None, *, mixed: bool | None = None) -> None:
        self.model = model
        self.lm = language_model_of(model)
        self.state = state if state is not None else model.new_state()
        # Whether a prompt's chunk rides in the decode call (`mixed`) while others decode;
        # default: when the bundle has the function. False: a prefill call, then a decode call.
        self.mixed = has_mixed(model) if mixed is None else bool(mixed and has_mixed(model))
        self._free = list(range(self.lm.slots))
        self._sequences: dict[Hashable, _Sequence] = {}  # oldest first

    @property
    def slots(self) -> int:
        return self.lm.slots

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def idle(self) -> bool:
        return not self._sequences

    def __contains__(self, id: Hashable) -> bool:
        return id in self._sequences

    def __len__(self) -> int:
        return len(self._sequences)

    @property
    def running(self) -> list[Hashable]:
        """The ids of the sequences in the batch, oldest first."""
        return list(self._sequences)

    def add(self, id: Hashable, ids: Sequence[int], max_new_tokens: int, sampling: Sampling = Sampling(),
            stop_token_ids: Sequence[int] | None = None) -> int:  # fmt: skip
        """Start sequence `id` after prompt `ids` in a free slot (returned); it is
        prefilled by the next steps. `stop_token_ids`: default the model's end-of-
        sequence tokens, [] never stops early. Raises UsageError for a full batch, an
        id already running, or a prompt that is empty, too long or outside the vocabulary."""
        lm = self.lm
        if id in self._sequences:
            raise UsageError(f"sequence {id!r} is already running")
        if not self._free:
            raise UsageError(f"every slot of the batch is taken ({lm.slots})")
        prompt = [int(t) for t in ids]
        if not prompt:
            raise UsageError("the prompt is empty (no tokens)")
        if len(prompt) > lm.max_context:
            raise UsageError(f"the prompt has {len(prompt)} tokens; this bundle's context holds {lm.max_context}")
        if bad := [t for t in prompt if not 0 <= t < lm.vocab_size]:
            raise UsageError(f"token id {bad[0]} is outside the vocabulary (0..{lm.vocab_size - 1})")
        if max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        stop = frozenset(lm.eos_token_ids if stop_token_ids is None else (int(t) for t in stop_token_ids))
        slot = self._free.pop(0)
        self._sequences[id] = _Sequence(id, prompt, int(max_new_tokens), sampling, stop, slot,
                                        np.random.default_rng(sampling.seed))  # fmt: skip
        return slot

    def cancel(self, id: Hashable) -> bool:
        """Stop sequence `id` and free its slot now; False if it is not running."""
        seq = self._sequences.pop(id, None)
        if seq is None:
            return False
        self._free.append(seq.slot)
        return True

    def step(self) -> list[Event]:
        """One prefill chunk (if a prompt is waiting) and one decode call (if a sequence
        has a token to extend): the tokens chosen, in order."""
        events: list[Event] = []
        lm, model, state = self.lm, self.model, self.state
        decoding = [s for s in self._sequences.values() if s.out]
        seq = next((s for s in self._sequences.values() if s.prefilling), None)
        if seq is not None and decoding and self.mixed:
            # The prompt's smallest chunk rides in the decode call: the weights are read
            # once for both. (Its first token, when the chunk ends the prompt, is
            # extended by the next step.)
            logits, first = mixed_step(model, lm, self._steps(decoding), seq.ids, seq.filled, state, seq.slot)
            self._read(seq, lm.prefill_chunk, first, events)
        else:
            if seq is not None:
                # With others decoding, the smallest chunk (a step then stalls them least);
                # alone, the largest the prompt fills (its first token sooner).
                chunk = next_chunk(lm.chunks, len(seq.ids) - seq.filled, smallest=bool(decoding))
                self._read(seq, chunk, prefill_chunk(model, lm, seq.ids, seq.filled, state, seq.slot, chunk=chunk), events)
            decoding = [s for s in self._sequences.values() if s.out]  # the one just prefilled included
            if not decoding:
                return events
            logits = decode_batch(model, lm, self._steps(decoding), state)
        for s in decoding:
            self._choose(s, logits[s.slot], events)
        return events

    @staticmethod
    def _steps(decoding: Sequence[_Sequence]) -> dict[int, tuple[int, int]]:
        # The last token's keys and values go to the position after the ones before it.
        return {s.slot: (s.out[-1], len(s.ids) + len(s.out) - 1) for s in decoding}

    def _read(self, seq: _Sequence, chunk: int, logits: np.ndarray, events: list[Event]) -> None:
        """`chunk` more prompt tokens of `seq` are in the cache; the prompt's last chunk's
        logits choose its first token."""
        seq.filled = min(len(seq.ids), seq.filled + chunk)
        if not seq.prefilling:
            self._choose(seq, logits, events)

    def _choose(self, seq: _Sequence, logits: np.ndarray, events: list[Event]) -> None:
        token = seq.sampling.choose(logits, seq.rng)
        seq.out.append(token)
        n = len(seq.out)
        # generate's rules: an end-of-sequence token; max_new_tokens; no position left for the next.
        finish = ("stop" if token in seq.stop_ids else
                  "length" if n >= seq.max_new_tokens or len(seq.ids) + n - 1 >= self.lm.max_context else None)  # fmt: skip
        if finish is not None:
            self.cancel(seq.id)
        events.append(Event(seq.id, token, finish))
