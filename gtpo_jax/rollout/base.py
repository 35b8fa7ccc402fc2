"""One interface for every rollout engine (JAX sampler, LMDeploy): built from a `RolloutSpec`,
it generates groups of rollouts with step maps and receives the trainer's new weights."""

from __future__ import annotations

import abc
import dataclasses
from typing import Sequence

import numpy as np

from gtpo_jax.data.tokenizer import TokenIds
from gtpo_jax.model.config import ModelConfig
from gtpo_jax.sampling import DecodingConfig, tokens_per_forward


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
    """What a rollout engine is built from; the trainer (or the evaluator) constructs it."""

    decoding: DecodingConfig  # the decoding rules and the engine sections
    ids: TokenIds  # block size, mask / pad / stop ids of the run
    model_cfg: ModelConfig | None = None  # the policy's architecture and dtypes (needed to push weights)
    hf_assets_dir: str | None = None  # config.json + tokenizer files of the policy (LMDeploy's exports)
    greedy: bool = False  # argmax decoding (evaluation)


@dataclasses.dataclass
class Rollout:
    """One response, from the engine that generated it to the GTPO loss: the engine fills the
    first fields, the trainer adds the rest as the step proceeds (the advantage, then the log-probs
    read off the training layout; the rewards live on the trainer's scored groups)."""

    prompt: np.ndarray  # int32 prompt ids
    tokens: np.ndarray  # int32 response ids, cut after the stop token / at max_new_tokens
    step_map: np.ndarray  # int32, docs/algorithm.md §2 counting rule
    logprobs: np.ndarray | None  # engine's raw log-probs at the committing forward (docs/algorithm.md §2)
    tail_tokens: np.ndarray | None = None  # tokens after the cut up to the end of its block (None: unknown)
    tail_steps: np.ndarray | None = None
    finish_reason: str = "stop"  # "stop" | "length"
    text: str = ""
    num_forwards: int = 0  # model forwards that processed this sequence (0: not reported by the engine)
    # -- added by the GTPO step (docs/algorithm.md §5) --
    advantage: float = 0.0  # (reward − group mean) / group std
    old_logprobs: np.ndarray | None = None  # l(θ_old) per response token, when num_iterations > 1
    ref_logprobs: np.ndarray | None = None  # l(θ_ref), when beta > 0
    # exact-state l(θ_old) (shrink 1) for the truncated importance weight when the loss's own
    # states are coarser (shrink > 1); docs/algorithm.md §5, training/inference mismatch
    exact_old_logprobs: np.ndarray | None = None

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"

    @property
    def tokens_per_forward(self) -> float:
        return tokens_per_forward(self.step_map)

    @property
    def tail(self) -> tuple[np.ndarray, np.ndarray] | None:
        return None if self.tail_tokens is None else (self.tail_tokens, self.tail_steps)


class RolloutBackend(abc.ABC):
    @abc.abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], n: int, *, seed: int) -> list[list[Rollout]]:
        """`n` rollouts per prompt, grouped by prompt, in prompt order."""

    @abc.abstractmethod
    def update_params(self, params) -> None:
        """Use these policy parameters (an nnx.State of the trainer's model) from now on."""

    def pause(self) -> None:  # noqa: B027 - optional hook
        """The trainer's update follows: free GPU memory until the next `update_params` (LMDeploy with
        gpu.sharing=sleep); a no-op for engines that share the trainer's parameters."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass
