"""How a language model's functions are called (`prefill`, `decode`, `mixed`): their argument lists, made in one
place for the runtime (`hxc.runtime.generate`), `hxc verify` and the compiler's eager
reference loop (`hxc.compiler.causal_lm.generate_greedy`). Numpy only.

    prefill(tokens[1, chunk], start[1], length[1], slot[1], span[R], *caches) -> logits[1, vocab], *caches
    decode(tokens[slots], positions[slots], span[R], *caches) -> logits[slots, vocab], *caches
    mixed(tokens[slots], positions[slots], span[R], chunk_tokens[1, chunk], start[1], length[1], slot[1],
          chunk_span[R2], *caches) -> logits[slots, vocab], logits[1, vocab], *caches

`span` carries only its length R: how many rows of the caches the call reads (every
position written so far, the call's own included). That is what makes a step's cost
follow the tokens in the cache rather than the maximum context. Its values are not read.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

MIXED = "mixed"  # a decode step and a prefill chunk in one call, in bundles of several slots (5.3)
MIN_SPAN = 2  # the compiled functions' smallest span (torch.export specialises a dynamic length of 1)


def span(rows: int, max_context: int) -> np.ndarray:
    """The `span` argument for a call that reads `rows` cache rows."""
    return np.zeros(min(max(rows, MIN_SPAN), max_context), np.int32)


def prefill_function(chunk: int, chunks: Sequence[int]) -> str:
    """The function that reads `chunk` prompt tokens a call: `prefill` for the smallest
    of a bundle's chunk sizes, `prefill_<chunk>` for each other."""
    return "prefill" if chunk == min(chunks) else f"prefill_{chunk}"


def next_chunk(chunks: Sequence[int], remaining: int, *, smallest: bool = False) -> int:
    """The chunk size of the next prefill call for a prompt with `remaining` tokens left:
    the largest one they fill (fewest calls, no padding), else the smallest. `smallest`:
    always the smallest (other sequences decode between the calls, and a long call
    would stall their next token)."""
    ordered = sorted(chunks)
    if smallest:
        return ordered[0]
    return max((c for c in ordered if c <= remaining), default=ordered[0])


def prefill_calls(prompt: Sequence[int], slot: int, chunks: Sequence[int], max_context: int) -> Iterator[tuple[str, list[np.ndarray]]]:
    """The prefill calls that read `prompt` into `slot`, in order, as (function, arguments):
    the largest chunk the remaining tokens fill each time (`next_chunk`)."""
    at = 0
    while at < len(prompt):  # bounded: every call consumes at least one token
        chunk = next_chunk(chunks, len(prompt) - at)
        yield prefill_function(chunk, chunks), prefill_args(prompt[at:at + chunk], at, slot, chunk, max_context)
        at += chunk


def prefill_args(piece: Sequence[int], start: int, slot: int, chunk: int, max_context: int) -> list[np.ndarray]:
    """Arguments for one prefill chunk: `piece` (at most `chunk` tokens) at positions
    start.. of `slot` (the rest of the chunk is padding)."""
    tokens = np.zeros((1, chunk), np.int32)
    tokens[0, :len(piece)] = piece
    one = lambda x: np.array([x], np.int32)  # noqa: E731
    return [tokens, one(start), one(len(piece)), one(slot), span(start + len(piece), max_context)]


def decode_args(steps: Mapping[int, tuple[int, int]], slots: int, max_context: int) -> list[np.ndarray]:
    """Arguments for one decode step of the slots in `steps` ({slot: (token, position)});
    every other slot is idle and writes the cache's scratch row (position max_context)."""
    tokens = np.zeros(slots, np.int32)
    positions = np.full(slots, max_context, np.int32)
    for slot, (token, position) in steps.items():
        tokens[slot], positions[slot] = token, position
    rows = 1 + max((p for _, p in steps.values()), default=0)
    return [tokens, positions, span(rows, max_context)]


def mixed_args(steps: Mapping[int, tuple[int, int]], slots: int, piece: Sequence[int], start: int, slot: int,
               chunk: int, max_context: int) -> list[np.ndarray]:  # fmt: skip
    """Arguments for `mixed`: the decode step of `steps` (`decode_args`) and the prefill
    chunk of `piece` into `slot` (`prefill_args`; `slot` must not be in `steps`)."""
    return [*decode_args(steps, slots, max_context), *prefill_args(piece, start, slot, chunk, max_context)]
