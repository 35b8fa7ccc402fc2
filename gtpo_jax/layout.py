"""The noisy-copy layout shared by SFT (random masks) and GTPO (trajectory states), docs/algorithm.md §3–§4.

A sample is its clean sequence (prompt + response, block-causal, computed once) followed by
noisy copies of some of its blocks. A copy of block j holds all B slots of block j at the
clean slots' RoPE positions, with some slots replaced by the mask token; it sees the clean
blocks < j and its own slots (see `gtpo_jax.model.attention.visibility`), and its targets are
some of its masked slots. `gtpo_jax.packing` packs samples into rows. Everything here is numpy:
it runs on the host, before the jitted step.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from gtpo_jax.rounding import round_up


@dataclasses.dataclass
class NoisyCopy:
    block: int  # absolute block index
    tokens: np.ndarray  # int32 [B]: block tokens with masked slots set to the mask id
    targets: np.ndarray  # int32 [B]: token to predict at each slot, -1 where not a target
    round_index: int = 0  # this copy's index among its block's copies: its round (GTPO's round_mean groups)


@dataclasses.dataclass
class SampleLayout:
    clean: np.ndarray  # int32 [P + R]: the clean sequence from position 0
    copies: list[NoisyCopy]

    @property
    def length(self) -> int:
        return len(self.clean) + sum(len(c.tokens) for c in self.copies)

    @property
    def num_targets(self) -> int:
        return int(sum((c.targets >= 0).sum() for c in self.copies))


@dataclasses.dataclass
class PackedBatch:
    """Rows of packed samples plus a flat list of target slots.

    `target_index` indexes the flattened [rows * row_len] token grid; target arrays are padded
    to `num_targets_padded` with `target_valid` = False.
    """

    tokens: np.ndarray  # int32 [rows, row_len]
    positions: np.ndarray
    segment: np.ndarray  # 0 = padding
    block: np.ndarray
    copy: np.ndarray  # 0 = clean, otherwise unique per copy within a segment
    target_index: np.ndarray  # int32 [T]
    target_token: np.ndarray  # int32 [T]
    target_sample: np.ndarray  # int32 [T], index into the input sample list
    target_round: np.ndarray  # int32 [T]
    target_valid: np.ndarray  # bool [T]
    num_samples: int

    def model_inputs(self) -> dict[str, np.ndarray]:
        return {
            "tokens": self.tokens,
            "positions": self.positions,
            "segment": self.segment,
            "block": self.block,
            "copy": self.copy,
            "target_index": self.target_index,
            "target_token": self.target_token,
        }


def gtpo_row_len(block_size: int, max_new_tokens: int, prompt_len: int) -> int:
    """Worst-case packed row of one rollout: clean prompt + response, plus at most B noisy copies
    of B slots per response block (every block decoded one token per forward), a multiple of 128."""
    response_blocks = max_new_tokens // block_size + 2
    return round_up(prompt_len + max_new_tokens + response_blocks * block_size * block_size, 128)


def trajectory_layout(
    prompt: Sequence[int],
    response: Sequence[int],
    step_map: Sequence[int],
    *,
    block_size: int,
    mask_id: int,
    shrink: int = 1,
    tail: tuple[Sequence[int], Sequence[int]] | None = None,
) -> SampleLayout:
    """docs/algorithm.md §3: one copy per (block, group of `shrink` distinct steps) of the response.

    The copy for a group whose first step is d masks every response slot of the block with
    step >= d (and tail slots with step >= d; slots past the response without a known tail are
    always masked); its targets are the response tokens whose step lies in the group.
    """
    prompt = np.asarray(prompt, np.int32)
    response = np.asarray(response, np.int32)
    steps = np.asarray(step_map, np.int64)
    if len(steps) != len(response):
        raise ValueError(f"step map has {len(steps)} entries for {len(response)} response tokens")
    if shrink < 1:
        raise ValueError(f"shrink must be >= 1, got {shrink}")
    p, r, b = len(prompt), len(response), block_size
    clean = np.concatenate([prompt, response])
    if r == 0:  # nothing to score (an empty response still counts in round_mean: the caller's job)
        return SampleLayout(clean, [])
    # Slot -> (token, step) over the whole sequence incl. the tail; prompt slots never masked.
    tail_tokens = np.asarray(tail[0] if tail else [], np.int32)
    tail_steps = np.asarray(tail[1] if tail else [], np.int64)
    if len(tail_tokens) != len(tail_steps):
        raise ValueError("tail tokens and tail steps differ in length")
    last_block = (p + r - 1) // b if r else -1
    end = (last_block + 1) * b
    if p + r + len(tail_tokens) > end:
        raise ValueError(f"tail of {len(tail_tokens)} tokens runs past the end of the response's last block")
    seq_tokens = np.full(end, mask_id, np.int32)
    seq_steps = np.full(end, np.iinfo(np.int64).max, np.int64)  # unknown slots: masked in every state
    seq_tokens[: p + r] = clean
    seq_steps[:p] = -1
    seq_steps[p : p + r] = steps
    seq_tokens[p + r : p + r + len(tail_tokens)] = tail_tokens
    seq_steps[p + r : p + r + len(tail_tokens)] = tail_steps
    is_response = np.zeros(end, bool)
    is_response[p : p + r] = True

    copies = []
    for j in range(p // b, last_block + 1):
        sl = slice(j * b, (j + 1) * b)
        block_steps, block_resp = seq_steps[sl], is_response[sl]
        distinct = np.unique(block_steps[block_resp])
        for rnd, start in enumerate(range(0, len(distinct), shrink)):
            group = distinct[start : start + shrink]
            masked = block_steps >= group[0]
            tokens = np.where(masked, mask_id, seq_tokens[sl]).astype(np.int32)
            is_target = block_resp & np.isin(block_steps, group)
            targets = np.where(is_target, seq_tokens[sl], -1).astype(np.int32)
            copies.append(NoisyCopy(j, tokens, targets, rnd))
    return SampleLayout(clean, copies)


def sft_layout(
    prompt: Sequence[int],
    response: Sequence[int],
    *,
    block_size: int,
    mask_id: int,
    pad_id: int,
    rng: np.random.Generator,
    lower_p: float = 0.1,
    upper_p: float = 0.9,
    mask_sampling: str = "per_block",
    post_num: int = 0,
    num_noisy_copies: int = 1,
) -> SampleLayout:
    """docs/algorithm.md §4: each response token (and up to `post_num` pad tokens after it) is masked with
    probability p ~ U(lower_p, upper_p), drawn per block or per token; one copy per response
    block per noisy copy, each with an independent mask. The last block is filled with pad
    tokens, the first `post_num` of which are maskable targets (they teach stopping)."""
    if mask_sampling not in ("per_block", "per_token"):
        raise ValueError(f"mask_sampling must be per_block or per_token, got {mask_sampling!r}")
    prompt = np.asarray(prompt, np.int32)
    response = np.asarray(response, np.int32)
    p, b = len(prompt), block_size
    maskable_len = len(response) + post_num
    end = round_up(p + maskable_len, b)
    seq = np.full(end, pad_id, np.int32)
    seq[:p] = prompt
    seq[p : p + len(response)] = response
    maskable = np.zeros(end, bool)
    maskable[p : p + maskable_len] = True
    # The pads of the last blocks are context too: copies of the last block see the clean
    # blocks before it, which may already hold post_num pads.
    clean = seq

    copies = []
    blocks = range(p // b, end // b)
    for rnd in range(num_noisy_copies):
        if mask_sampling == "per_block":
            probs = np.repeat(rng.uniform(lower_p, upper_p, size=len(blocks)), b)
        else:
            probs = rng.uniform(lower_p, upper_p, size=len(blocks) * b)
        draws = rng.random(len(blocks) * b) < probs
        for i, j in enumerate(blocks):
            sl = slice(j * b, (j + 1) * b)
            masked = maskable[sl] & draws[i * b : (i + 1) * b]
            tokens = np.where(masked, mask_id, seq[sl]).astype(np.int32)
            targets = np.where(masked, seq[sl], -1).astype(np.int32)
            copies.append(NoisyCopy(j, tokens, targets, rnd))
    return SampleLayout(clean, copies)
