"""The JAX rollout engine: `gtpo_jax.sampling`'s cached block-diffusion sampler behind the
`RolloutBackend` interface, sharing the trainer's parameters (no copy, no conversion). The
sampler returns per-sequence arrays; this module makes the `Rollout` records of them."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from flax import nnx

from gtpo_jax.rollout.base import Rollout, RolloutBackend, RolloutSpec
from gtpo_jax.sampling import BlockDiffusionSampler, SampleBatch, SamplerConfig


class JaxRollout(RolloutBackend):
    def __init__(self, model: nnx.Module, config: SamplerConfig, *, tokenizer=None, mesh=None):
        self.sampler = BlockDiffusionSampler(model, config, mesh=mesh)
        self.tokenizer = tokenizer  # decodes the responses' text (None: no text)

    @classmethod
    def from_spec(cls, spec: RolloutSpec, model: nnx.Module, *, tokenizer=None, mesh=None) -> "JaxRollout":
        """`model` decodes under `spec`'s rules (`decoding.jax` bounds one jitted call)."""
        return cls(model, SamplerConfig.of(spec.decoding, spec.ids, greedy=spec.greedy), tokenizer=tokenizer, mesh=mesh)

    def generate(self, prompts: Sequence[Sequence[int]], n: int, *, seed: int) -> list[list[Rollout]]:
        """`n` rollouts per prompt, grouped by prompt (sample j of prompt i uses stream i·n + j)."""
        flat = [list(p) for p in prompts for _ in range(n)]
        rollouts = rollouts_of(flat, self.sampler.sample(flat, seed=seed), self.tokenizer)
        return [rollouts[i * n : (i + 1) * n] for i in range(len(prompts))]

    def update_params(self, params) -> None:
        """Point the sampler at the trainer's current parameters (same graph as the model)."""
        nnx.update(self.sampler.model, params)


def rollouts_of(prompts: Sequence[Sequence[int]], batch: SampleBatch, tokenizer=None) -> list[Rollout]:
    """One `Rollout` per sampled sequence; the text is the response up to (without) its stop token."""
    rollouts = []
    for i, p in enumerate(prompts):
        tokens, reason = batch.tokens[i], batch.finish_reasons[i]
        text = ""
        if tokenizer is not None:
            kept = tokens[:-1] if reason == "stop" else tokens
            text = tokenizer.decode(kept.tolist(), skip_special_tokens=False)
        rollouts.append(Rollout(prompt=np.asarray(p, np.int32), tokens=tokens, step_map=batch.step_maps[i],
                                logprobs=batch.logprobs[i], tail_tokens=batch.tail_tokens[i],
                                tail_steps=batch.tail_steps[i], finish_reason=reason, text=text,
                                num_forwards=batch.num_forwards[i]))
    return rollouts
