"""The typed configuration tree of a run: YAML file + `key=value` overrides (see config_loader).

One tree for every stage; `stage` picks the trainer and the sections it reads. Defaults are
SPEC's bracketed values.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

from gtpo_jax.config_checks import range_problems
from gtpo_jax.config_loader import ConfigError
from gtpo_jax.distributed import DistributedSection


@dataclasses.dataclass
class ModelSection:
    # HF directory or Orbax checkpoint directory; None = random init from `preset` (demos, tests).
    path: Optional[str] = None
    preset: Literal["tiny", "sdar_1_7b", "sdar_8b"] = "tiny"
    # Architecture overrides for the random-init preset (e.g. {"num_layers": 4}).
    preset_overrides: dict = dataclasses.field(default_factory=dict)
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    dtype: Literal["float32", "bfloat16"] = "float32"
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    attn_q_tile: int = 256
    attn_kv_tile: int = 256
    init_seed: int = 0


@dataclasses.dataclass
class TokenizerSection:
    # Directory loadable by transformers.AutoTokenizer; None = the model path, or for the demo
    # preset the built-in tiny tokenizer written under the run directory.
    path: Optional[str] = None


@dataclasses.dataclass
class DataSection:
    train_files: list[str] = dataclasses.field(default_factory=list)
    eval_files: list[str] = dataclasses.field(default_factory=list)
    # Built-in synthetic arithmetic task instead of files (CPU demo).
    synthetic: bool = False
    synthetic_train: int = 4000
    synthetic_eval: int = 200
    synthetic_digits: int = 2
    max_len: int = 512  # prompt + response tokens
    over_length: Literal["truncate", "skip"] = "truncate"
    prompt_too_long: Literal["error", "skip"] = "error"
    shuffle_seed: int = 0
    epochs: int = 0  # 0 = repeat forever
    think: bool = False  # append <think> to the prompt template


@dataclasses.dataclass
class MaskingSection:
    mask_sampling: Literal["per_block", "per_token"] = "per_block"
    lower_p: float = 0.1
    upper_p: float = 0.9
    post_num: int = 0
    num_noisy_copies: int = 1


@dataclasses.dataclass
class OptimSection:
    lr: float = 1e-5
    schedule: Literal["constant", "warmup_cosine"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 1.0


@dataclasses.dataclass
class TrainSection:
    steps: int = 100
    batch_size: int = 8  # samples (SFT) per optimizer step
    micro_batches: int = 1  # gradient accumulation
    row_len: int = 0  # packed row length; 0 = derived from max_len
    rows_per_micro_batch: int = 0  # 0 = as many as the micro-batch needs (padded to a bucket)
    seed: int = 0
    max_bad_steps: int = 3  # consecutive non-finite steps before stopping
    log_every: int = 1
    vocab_chunk: int = 256
    wandb_project: Optional[str] = None


@dataclasses.dataclass
class CheckpointSection:
    save_every: int = 100
    keep: int = 3
    resume: bool = True
    async_save: bool = True
    export_hf: bool = True  # write an HF directory at the end of the run
    export_dtype: Optional[Literal["float32", "bfloat16"]] = None


@dataclasses.dataclass
class MeshSection:
    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclasses.dataclass
class RolloutSection:
    backend: Literal["jax", "lmdeploy"] = "jax"
    strategy: Literal["low_confidence_static", "low_confidence_dynamic", "sequential"] = "low_confidence_dynamic"
    denoising_steps: int = 4
    threshold: float = 0.9
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    # LMDeploy-only knobs
    tensor_parallel: int = 1
    cache_max_entry_count: float = 0.8


@dataclasses.dataclass
class GPUSection:
    """How the trainer (JAX) and the LMDeploy engine share each node's GPUs (rollout.backend=lmdeploy;
    `gtpo_jax.memory_plan` prints the budget at start-up and refuses a plan that cannot fit)."""

    # split: JAX preallocates `trainer_fraction` of every GPU (XLA_PYTHON_CLIENT_MEM_FRACTION, set
    #   before JAX starts); the engine's weights and KV cache live in the rest.
    # sleep: JAX allocates on demand and frees after each step (XLA_PYTHON_CLIENT_ALLOCATOR=platform);
    #   the engine sleeps during the update (LMDeploy sleep level 2: KV cache and weights freed) and
    #   wakes for the next weight push, so rollouts and training each get most of the memory in turn.
    sharing: Literal["split", "sleep"] = "split"
    trainer_fraction: float = 0.5
    memory_gib: float = 0.0  # memory of one GPU; 0 = as the device reports
    activation_gib: float = 0.0  # the trainer's peak temporaries per GPU; 0 = the plan's estimate
    check: bool = True  # refuse a plan that cannot fit (false: only print it)


@dataclasses.dataclass
class GTPOSection:
    num_task_per_step: int = 128
    num_response_per_task: int = 8
    oversample: int = 3
    dynamic_sampling: bool = True
    eps_low: float = 0.2
    eps_high: float = 0.28
    beta: float = 0.0
    loss_norm: Literal["round_mean", "token_mean"] = "round_mean"
    shrink: int = 1
    num_iterations: int = 1
    mini_batches: int = 1
    tis_cap: float = 0.0  # truncated importance weight cap C; 0 = off
    rewards: dict = dataclasses.field(default_factory=lambda: {"accuracy": 1.0})
    # Weights must be >= 0 unless this is set: a minus sign is more often a typo than a penalty.
    negative_reward_weights: bool = False
    # Modules imported before training; they register custom rewards with
    # `gtpo_jax.rewards.register_reward` (every process imports them).
    reward_modules: list[str] = dataclasses.field(default_factory=list)
    reward_params: dict = dataclasses.field(default_factory=dict)
    grader_workers: int = 2
    grader_timeout_s: float = 10.0


@dataclasses.dataclass
class EvalSection:
    enabled: bool = True  # held-out accuracy at the start and end of a run (and every `every` steps)
    every: int = 0  # evaluate every N steps during training; 0 = only at start and end
    num_samples: int = 1
    greedy: bool = True
    max_questions: int = 0  # 0 = all


@dataclasses.dataclass
class Config:
    stage: Literal["sft", "gtpo"]
    output_dir: str = "runs/default"
    block_size: int = 4
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    tokenizer: TokenizerSection = dataclasses.field(default_factory=TokenizerSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    masking: MaskingSection = dataclasses.field(default_factory=MaskingSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    rollout: RolloutSection = dataclasses.field(default_factory=RolloutSection)
    gtpo: GTPOSection = dataclasses.field(default_factory=GTPOSection)
    gpu: GPUSection = dataclasses.field(default_factory=GPUSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    distributed: DistributedSection = dataclasses.field(default_factory=DistributedSection)

    def validate(self) -> None:
        """Every value in its allowed range, plus cross-field checks: fails before any work starts,
        with one line that names each bad key (ConfigError, a ValueError)."""
        problems = range_problems(self)
        if self.masking.lower_p > self.masking.upper_p:
            problems.append(f"masking.lower_p ({self.masking.lower_p}) must be <= masking.upper_p ({self.masking.upper_p})")
        if self.rollout.min_new_tokens > self.rollout.max_new_tokens:
            problems.append(f"rollout.min_new_tokens ({self.rollout.min_new_tokens}) must be <= "
                            f"rollout.max_new_tokens ({self.rollout.max_new_tokens})")
        if self.rollout.backend == "lmdeploy" and self.model.dtype != "bfloat16":
            problems.append(f"rollout.backend=lmdeploy runs rollouts in the trainer's compute dtype, which LMDeploy "
                            f"supports in bfloat16 only here: set model.dtype=bfloat16 (got {self.model.dtype})")
        if self.optim.schedule == "warmup_cosine" and self.optim.warmup_steps >= self.train.steps:
            problems.append(f"optim.warmup_steps ({self.optim.warmup_steps}) must be < train.steps ({self.train.steps})")
        if self.stage == "sft" and self.train.micro_batches >= 1 and self.train.batch_size % self.train.micro_batches:
            problems.append(
                f"train.batch_size ({self.train.batch_size}) must be a multiple of train.micro_batches "
                f"({self.train.micro_batches})"
            )
        if self.stage == "sft" and not (self.data.train_files or self.data.synthetic):
            problems.append("sft needs data.train_files (JSON/JSONL/Parquet) or data.synthetic=true")
        if self.stage == "gtpo":
            problems.extend(reward_weight_problems(self.gtpo))
        if problems:
            raise ConfigError("invalid configuration: " + "; ".join(problems))


def reward_weight_problems(g: GTPOSection) -> list[str]:
    if not g.rewards:
        return ["gtpo.rewards must name at least one reward function, e.g. {accuracy: 1.0}"]
    problems = []
    for name, weight in g.rewards.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            problems.append(f"gtpo.rewards.{name} must be a finite number, got {weight!r}")
        elif weight < 0 and not g.negative_reward_weights:
            problems.append(f"gtpo.rewards.{name} must be >= 0, got {weight} (a penalty needs "
                            "gtpo.negative_reward_weights=true)")
    return problems
