"""The typed configuration tree of a run: YAML file + `key=value` overrides (see config_loader).

One tree for every stage; `stage` picks the trainer and the sections it reads. Defaults are
the bracketed values of docs/algorithm.md.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Literal, Optional

from gtpo_jax.config_checks import range_problems
from gtpo_jax.config_loader import ConfigError
from gtpo_jax.data.synthetic import task_paths
from gtpo_jax.data.tokenizer import tokenizer_dir_for
from gtpo_jax.distributed import DistributedSection
from gtpo_jax.model.config import ModelRuntime
from gtpo_jax.rewards.grading import GraderConfig
from gtpo_jax.sampling.decoding import DecodingConfig
from gtpo_jax.sharding import MeshConfig


@dataclasses.dataclass(frozen=True)
class ModelSection(ModelRuntime):
    """Which model (path or preset), plus the runtime fields it shares with ModelConfig."""

    # HF directory or Orbax checkpoint directory; None = random init from `preset` (demos, tests).
    path: Optional[str] = None
    preset: Literal["tiny", "sdar_1_7b", "sdar_8b"] = "tiny"  # architecture of a random-init model (model.path unset)
    # Architecture overrides for the random-init preset (e.g. {"num_layers": 4}).
    preset_overrides: dict = dataclasses.field(default_factory=dict)
    init_seed: int = 0  # seed of a random-init model's parameters


@dataclasses.dataclass
class TokenizerSection:
    # Directory loadable by transformers.AutoTokenizer; None = the model path, or for the demo
    # preset the built-in tiny tokenizer written under the run directory.
    path: Optional[str] = None


@dataclasses.dataclass
class DataSection:
    # training records: JSONL, JSON list or Parquet (formats: README, Data formats)
    train_files: list[str] = dataclasses.field(default_factory=list)
    # held-out RL records for accuracy during training (builtin:<name> = a shipped set)
    eval_files: list[str] = dataclasses.field(default_factory=list)
    # Built-in synthetic arithmetic task instead of files (CPU demo).
    synthetic: bool = False
    synthetic_train: int = 4000  # questions in the synthetic training set
    synthetic_eval: int = 200  # held-out synthetic questions (never in the training set)
    synthetic_digits: int = 2  # digits of each number added in the synthetic task
    # fraction of the synthetic SFT solutions needing a carry in which the teacher forgets it
    # (wrong worked solution and answer); RL prompts and held-out answers stay correct
    synthetic_carry_slip: float = 0.0
    # fraction of the synthetic SFT solutions that trail off into random punctuation after the
    # boxed answer (costs parallel decoding, not correctness: what the speed reward can remove)
    synthetic_ramble: float = 0.0
    max_len: int = 512  # prompt + response tokens
    # a sample longer than max_len: cut the response, or drop the sample (both counted)
    over_length: Literal["truncate", "skip"] = "truncate"
    # a prompt alone longer than max_len: stop with an error, or drop the sample (counted)
    prompt_too_long: Literal["error", "skip"] = "error"
    shuffle_seed: int = 0  # seed of the per-epoch shuffle of the training records (and of the synthetic task)
    epochs: int = 0  # 0 = repeat forever
    think: bool = False  # append <think> to the prompt template


@dataclasses.dataclass
class MaskingSection:
    # SFT: draw the masking probability p once per block, or once per token
    mask_sampling: Literal["per_block", "per_token"] = "per_block"
    lower_p: float = 0.1  # SFT: p is drawn from U(lower_p, upper_p)
    upper_p: float = 0.9  # SFT: upper end of the masking probability's range
    post_num: int = 0  # SFT: up to this many pad slots after the response are trained as targets (teaches stopping)
    num_noisy_copies: int = 1  # SFT: independent maskings of each sample, sharing one clean pass


STAGE_LR = {"sft": 1e-5, "gtpo": 1e-6}  # docs/algorithm.md §5.5: the default learning rate of each stage


@dataclasses.dataclass
class OptimSection:
    # AdamW peak learning rate; unset = the stage's default (sft 1e-5, gtpo 1e-6), filled in by Config
    lr: Optional[float] = None
    # constant, or linear warm-up then cosine decay to min_lr_ratio × lr
    schedule: Literal["constant", "warmup_cosine"] = "constant"
    # optimizer updates of linear warm-up (warmup_cosine); schedules count updates: gtpo makes
    # num_iterations × mini_batches of them per step
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # final learning rate as a fraction of lr (warmup_cosine)
    b1: float = 0.9  # AdamW first-moment decay
    b2: float = 0.999  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    clip_norm: float = 1.0  # global gradient-norm clip; 0 = off


@dataclasses.dataclass
class TrainSection:
    steps: int = 100  # optimizer steps (SFT) or RL steps (GTPO) of the run
    batch_size: int = 8  # samples (SFT) per optimizer step
    micro_batches: int = 1  # gradient accumulation
    row_len: int = 0  # packed row length; 0 = derived from max_len
    rows_per_micro_batch: int = 0  # 0 = as many as the micro-batch needs (padded to a bucket)
    seed: int = 0  # seed of masking and rollout randomness (a step's draws depend only on seed and step)
    max_bad_steps: int = 3  # consecutive non-finite steps before stopping
    log_every: int = 1  # print a step line every N steps (metrics.jsonl gets every step)
    vocab_chunk: int = 256  # vocabulary projection chunk: target slots are projected this many at a time
    # The update's forward keeps its [targets, vocab] fp32 logits for the backward (one matmul of
    # 2·targets·hidden·vocab fewer) when they fit in this many MB per micro-batch; 0 = always recompute.
    # 2048 holds ~3.4k targets of a 152k vocabulary: +6-9% update speed at 1k-2k response tokens on a CPU
    vocab_saved_logits_mb: int = 2048
    wandb_project: Optional[str] = None  # Weights & Biases project to log to as well (extra `wandb`); null = off


@dataclasses.dataclass
class CheckpointSection:
    save_every: int = 100  # save a checkpoint every N steps (and always at the end)
    keep: int = 3  # checkpoints kept (the oldest are deleted); 0 = all
    resume: bool = True  # continue from the newest undamaged checkpoint in output_dir/checkpoints
    step: Optional[int] = None  # resume from this step instead (see output_dir/checkpoints); null = the newest
    async_save: bool = True  # write checkpoints in the background while training goes on
    export_hf: bool = True  # write an HF directory at the end of the run
    # dtype of the final HF export; null = the parameters' dtype
    export_dtype: Optional[Literal["float32", "bfloat16"]] = None
    # Resume although the config differs from the run's stored config.yaml (train.steps and keys that
    # only say how a run is saved, evaluated, placed or logged may always change: RESUMABLE_KEYS).
    accept_config_changes: bool = False


@dataclasses.dataclass
class GPUSection:
    """How the trainer (JAX) and the LMDeploy engine share each node's GPUs (decoding.backend=lmdeploy;
    `gtpo_jax.memory_plan` prints the budget at start-up and refuses a plan that cannot fit)."""

    # split: JAX preallocates `trainer_fraction` of every GPU (XLA_PYTHON_CLIENT_MEM_FRACTION, set
    #   before JAX starts); the engine's weights and KV cache live in the rest.
    # sleep: JAX allocates on demand and frees after each step (XLA_PYTHON_CLIENT_ALLOCATOR=platform);
    #   the engine sleeps during the update (LMDeploy sleep level 2: KV cache and weights freed) and
    #   wakes for the next weight push, so rollouts and training each get most of the memory in turn.
    sharing: Literal["split", "sleep"] = "split"
    trainer_fraction: float = 0.5  # split: fraction of each GPU's memory JAX preallocates
    memory_gib: float = 0.0  # memory of one GPU; 0 = as the device reports
    activation_gib: float = 0.0  # the trainer's peak temporaries per GPU; 0 = the plan's estimate
    check: bool = True  # refuse a plan that cannot fit (false: only print it)


@dataclasses.dataclass
class GTPOSection:
    num_task_per_step: int = 128  # prompt groups trained on per RL step
    num_response_per_task: int = 8  # rollouts per prompt (a group; advantages are normalised within it)
    oversample: int = 3  # dynamic sampling draws oversample × (groups still missing) prompts per round
    dynamic_sampling: bool = True  # keep only groups whose accuracy is strictly between 0 and 1 (DAPO)
    # accuracy: SPEC 5.2's rule above. reward (a proposal outside SPEC): also keep groups of accuracy 0 or 1
    # whose rewards differ, e.g. all-right groups whose answers decode at different speeds (speed reward).
    dynamic_sampling_keep: Literal["accuracy", "reward"] = "accuracy"
    shuffle: bool = True  # prompts in a seeded per-epoch shuffle (data.shuffle_seed); false: file order
    max_rounds: int = 8  # dynamic-sampling rounds per step, then train on what was kept (with a warning)
    eps_low: float = 0.2  # ratio clip: lower bound 1 - eps_low
    eps_high: float = 0.28  # ratio clip: upper bound 1 + eps_high
    beta: float = 0.0  # weight of the k3 KL penalty to the frozen starting policy; 0 = off
    # round_mean: per-round means summed per response; token_mean: mean over all tokens
    loss_norm: Literal["round_mean", "token_mean"] = "round_mean"
    shrink: int = 1  # merge every `shrink` consecutive decoding steps of a block into one (1 = exact)
    num_iterations: int = 1  # optimizer passes over each step's rollouts
    mini_batches: int = 1  # optimizer updates per pass, each on its share of the responses
    tis_cap: float = 0.0  # truncated importance weight cap C; 0 = off
    # reward function name -> weight; the reward is the weighted sum
    rewards: dict = dataclasses.field(default_factory=lambda: {"accuracy": 1.0})
    # Weights must be >= 0 unless this is set: a minus sign is more often a typo than a penalty.
    negative_reward_weights: bool = False
    # Modules imported before training; they register custom rewards with
    # `gtpo_jax.rewards.register_reward` (every process imports them).
    reward_modules: list[str] = dataclasses.field(default_factory=list)
    # parameters the reward functions read (e.g. cosine_max_len)
    reward_params: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class EvalSection:
    """Held-out accuracy: during training (data.eval_files) and in `python -m gtpo_jax.evaluate`."""

    enabled: bool = True  # training: held-out accuracy at the start and end of a run (and every `every` steps)
    every: int = 0  # training: evaluate every N steps as well; 0 = only at start and end
    num_samples: int = 1  # samples per question (accuracy = mean over them)
    greedy: bool = True  # decode greedily instead of sampling
    max_questions: int = 0  # questions per dataset; 0 = all
    # questions decoded together (num_samples each); each batch has its own seed, so this changes the samples
    questions_per_batch: int = 64


@dataclasses.dataclass
class Config:
    stage: Literal["sft", "gtpo"]  # which trainer runs: sft or gtpo
    output_dir: str = "runs/default"  # run directory: config.yaml, metrics, checkpoints, hf/ export
    block_size: int = 4  # diffusion block size B (must match the checkpoint's)
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    tokenizer: TokenizerSection = dataclasses.field(default_factory=TokenizerSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    masking: MaskingSection = dataclasses.field(default_factory=MaskingSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    decoding: DecodingConfig = dataclasses.field(default_factory=DecodingConfig)
    gtpo: GTPOSection = dataclasses.field(default_factory=GTPOSection)
    grader: GraderConfig = dataclasses.field(default_factory=GraderConfig)
    gpu: GPUSection = dataclasses.field(default_factory=GPUSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    distributed: DistributedSection = dataclasses.field(default_factory=DistributedSection)

    # Keys of earlier releases and where they went: load_config names the new place of each one used.
    MOVED_KEYS = {
        **{f"rollout.{k}": f"decoding.{k}" for k in ("backend", "strategy", "denoising_steps", "threshold",
                                                     "temperature", "top_k", "top_p", "max_new_tokens",
                                                     "min_new_tokens")},
        **{f"rollout.{k}": f"decoding.lmdeploy.{k}" for k in ("tensor_parallel", "cache_max_entry_count",
                                                              "trust_remote_code")},
        "rollout.jax_max_batch": "decoding.jax.max_batch", "rollout.jax_cache_gib": "decoding.jax.cache_gib",
        "rollout": "decoding",
        "gtpo.grader_workers": "grader.workers", "gtpo.grader_timeout_s": "grader.timeout_s",
    }

    def resolve_paths(self) -> None:
        """Fill in the paths a run derives from other keys, so that config.yaml and --print-config
        show what the run really reads: with data.synthetic, the task files under
        `output_dir/data` (and, for a random-init model without a tokenizer, the tiny tokenizer
        under `output_dir/tokenizer`); a tokenizer left unset is the model's."""
        if self.data.synthetic:
            paths = task_paths(os.path.join(self.output_dir, "data"))
            if not self.data.train_files:
                self.data.train_files = [paths["sft_train" if self.stage == "sft" else "rl_train"]]
            if not self.data.eval_files:
                self.data.eval_files = [paths["rl_eval"]]
            if self.tokenizer.path is None and self.model.path is None:
                self.tokenizer.path = os.path.join(self.output_dir, "tokenizer")
        if self.tokenizer.path is None and self.model.path is not None:
            self.tokenizer.path = tokenizer_dir_for(self.model.path)

    def __post_init__(self):
        if self.optim.lr is None and self.stage in STAGE_LR:
            self.optim.lr = STAGE_LR[self.stage]  # resolved here, so config.yaml / --print-config show it

    def updates_per_step(self) -> int:
        """Optimizer updates per training step: the unit learning-rate schedules count in."""
        return self.gtpo.num_iterations * self.gtpo.mini_batches if self.stage == "gtpo" else 1

    def validate(self) -> None:
        """Every value in its allowed range, plus cross-field checks: fails before any work starts,
        with one line that names each bad key (ConfigError, a ValueError)."""
        problems = range_problems(self)
        if self.masking.lower_p > self.masking.upper_p:
            problems.append(f"masking.lower_p ({self.masking.lower_p}) must be <= masking.upper_p ({self.masking.upper_p})")
        problems.extend(decoding_problems(self.decoding))
        if self.decoding.backend == "lmdeploy" and self.model.dtype != "bfloat16":
            problems.append(f"decoding.backend=lmdeploy runs rollouts in the trainer's compute dtype, which LMDeploy "
                            f"supports in bfloat16 only here: set model.dtype=bfloat16 (got {self.model.dtype})")
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


def decoding_problems(d: DecodingConfig) -> list[str]:
    if d.min_new_tokens > d.max_new_tokens:
        return [f"decoding.min_new_tokens ({d.min_new_tokens}) must be <= decoding.max_new_tokens "
                f"({d.max_new_tokens})"]
    return []


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
