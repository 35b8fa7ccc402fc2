"""The JAX rollout engine: `gtpo_jax.sampling`'s cached block-diffusion sampler behind the
`RolloutBackend` interface, sharing the trainer's parameters (no copy, no conversion)."""

from __future__ import annotations

from typing import Sequence

from flax import nnx

from gtpo_jax.config import RolloutSection
from gtpo_jax.rollout.base import Rollout, RolloutBackend
from gtpo_jax.sampling import BlockDiffusionSampler, SamplerConfig


class JaxRollout(RolloutBackend):
    def __init__(self, model: nnx.Module, config: SamplerConfig, *, tokenizer=None, mesh=None):
        self.sampler = BlockDiffusionSampler(model, config, mesh=mesh, tokenizer=tokenizer)

    @classmethod
    def from_config(cls, model: nnx.Module, tokenizer, rollout_cfg: RolloutSection, *, block_size: int,
                    greedy: bool = False, mesh=None, stop_ids: Sequence[int] | None = None,
                    mask_id: int | None = None) -> "JaxRollout":
        """Decoding rules from `rollout_cfg`; mask / stop ids from the tokenizer unless given.
        Optional `jax_max_batch` / `jax_cache_gib` fields of the section bound one jitted call."""
        from gtpo_jax.data.tokenizer import mask_token_id, stop_token_ids

        c = rollout_cfg
        config = SamplerConfig(
            block_size=block_size,
            mask_id=mask_token_id(tokenizer) if mask_id is None else mask_id,
            stop_ids=tuple(stop_token_ids(tokenizer) if stop_ids is None else stop_ids),
            strategy=c.strategy, denoising_steps=c.denoising_steps, threshold=c.threshold,
            temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, greedy=greedy,
            max_new_tokens=c.max_new_tokens, min_new_tokens=c.min_new_tokens,
            max_batch=getattr(c, "jax_max_batch", None) or None, cache_gib=getattr(c, "jax_cache_gib", None) or None,
        )
        return cls(model, config, tokenizer=tokenizer, mesh=mesh)

    def generate(self, prompts: Sequence[Sequence[int]], n: int, *, seed: int) -> list[list[Rollout]]:
        return self.sampler.generate(prompts, n, seed=seed)

    def update_params(self, params) -> None:
        """Point the sampler at the trainer's current parameters (same graph as the model)."""
        nnx.update(self.sampler.model, params)
