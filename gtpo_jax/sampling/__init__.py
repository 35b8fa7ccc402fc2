"""Block-diffusion sampling (docs/algorithm.md §2): `BlockDiffusionSampler` under a `SamplerConfig`."""

from gtpo_jax.sampling.sampler import (
    STRATEGIES,
    BlockDiffusionSampler,
    SampleBatch,
    SamplerConfig,
    filter_scores,
    select_slots,
    tokens_per_forward,
)

__all__ = ["STRATEGIES", "BlockDiffusionSampler", "SampleBatch", "SamplerConfig", "filter_scores", "select_slots",
           "tokens_per_forward"]
