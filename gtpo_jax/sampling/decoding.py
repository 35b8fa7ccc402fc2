"""The decoding settings (docs/algorithm.md §2), one type for every place that decodes: the config
tree's `decoding:` section, the JAX sampler (`SamplerConfig` adds the resolved token ids), the
LMDeploy engine (its engine and generation configs are derived from it) and the sampling CLI
(whose key=value options are these fields)."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

STRATEGIES = ("low_confidence_static", "low_confidence_dynamic", "sequential")


@dataclasses.dataclass
class JaxEngineSection:
    # sequences per jitted sampler call; null = as many as the cache budget allows
    max_batch: Optional[int] = None
    # KV-cache budget of one sampler call over all devices (GiB); null = unlimited
    cache_gib: Optional[float] = None


@dataclasses.dataclass
class LMDeployEngineSection:
    tensor_parallel: int = 1  # tensor-parallel GPUs of the engine
    cache_max_entry_count: float = 0.8  # fraction of free GPU memory for the KV cache
    # let LMDeploy run Python code shipped in the model directory (config.json's auto_map); SDAR loads
    # without it, so set it only for a model that needs its own code, and only if you trust that code
    trust_remote_code: bool = False


@dataclasses.dataclass
class DecodingConfig:
    # decoder of rollouts and evaluation: the JAX sampler, or LMDeploy (GPU)
    backend: Literal["jax", "lmdeploy"] = "jax"
    # which masked slots a forward commits (docs/algorithm.md, Decoding)
    strategy: Literal["low_confidence_static", "low_confidence_dynamic", "sequential"] = "low_confidence_dynamic"
    denoising_steps: int = 4  # low_confidence_static: commit block_size / denoising_steps slots per forward
    threshold: float = 0.9  # low_confidence_dynamic: commit every slot at least this confident (and the top one)
    temperature: float = 1.0  # divides the logits before sampling and confidences
    top_k: int = 0  # sample among the k most likely tokens; 0 = all
    top_p: float = 1.0  # sample from the smallest set holding this probability mass; 1 = all
    max_new_tokens: int = 256  # response length limit (tokens)
    min_new_tokens: int = 0  # stop tokens are suppressed until this many tokens (block-granular)
    jax: JaxEngineSection = dataclasses.field(default_factory=JaxEngineSection)  # the JAX sampler's limits
    lmdeploy: LMDeployEngineSection = dataclasses.field(default_factory=LMDeployEngineSection)  # LMDeploy's engine
