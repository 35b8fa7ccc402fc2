"""Block-diffusion sampling (docs/algorithm.md §2): `BlockDiffusionSampler` under a `SamplerConfig`
(the `DecodingConfig` of the config tree plus the resolved token ids)."""

from gtpo_jax.sampling.decoding import STRATEGIES, DecodingConfig, JaxEngineSection, LMDeployEngineSection
from gtpo_jax.sampling.rules import filter_scores, select_slots
from gtpo_jax.sampling.sampler import BlockDiffusionSampler, SampleBatch, SamplerConfig, tokens_per_forward

__all__ = [
    "STRATEGIES", "BlockDiffusionSampler", "DecodingConfig", "JaxEngineSection", "LMDeployEngineSection", "SampleBatch",
    "SamplerConfig", "filter_scores", "select_slots", "tokens_per_forward",
]
