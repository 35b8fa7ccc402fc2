"""Architecture of an SDAR / Qwen3 decoder, read from (and written back to) an HF config.json."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Literal

from gtpo_jax.model.presets import HF_PRESETS

SUPPORTED_MODEL_TYPES = ("sdar", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16")

_REQUIRED_HF_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


class ModelConfigError(ValueError):
    """A model configuration that cannot describe a supported SDAR/Qwen3 model."""


def read_json_file(path: str | os.PathLike) -> Any:
    """The JSON in `path` (config.json, an index), or one error naming the file and what is wrong."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ModelConfigError(f"{path} is not valid UTF-8 (byte offset {e.start}); the file is damaged") from None
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                               "the file is damaged or was cut short: copy it again from the model's source") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelRuntime:
    """How a model runs, not what it is (no part of a checkpoint): one type for the config tree's
    `model:` section and for `ModelConfig`, which both inherit these fields."""

    param_dtype: Literal["float32", "bfloat16"] = "float32"  # dtype the parameters are stored and updated in
    dtype: Literal["float32", "bfloat16"] = "float32"  # dtype of the forward computation (activations, matmuls)
    # activation rematerialisation per decoder layer: none, full, or save only matmul outputs (dots)
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    # Rows shorter than 8 tiles use smaller ones (`attention_tiles`); the GPU kernels choose their own.
    attn_q_tile: int = 256  # largest query tile of the JAX attention kernel (tokens; shorter rows: smaller)
    attn_kv_tile: int = 256  # largest key/value tile of the JAX attention kernel (tokens; shorter rows: smaller)

    def attention_tiles(self, length: int) -> tuple[int, int]:
        """(query tile, key tile) for rows of `length` tokens: each configured tile halved (down to
        MIN_ATTENTION_TILE) until the row holds ROW_TILES of them. The kernel skips a tile pair only
        when no query sees a key, and a packed row's samples are each a few tiles long only if the
        tiles are short: the CPU demo's SFT rows (3 samples of ~145 tokens in 512) compute 75% of
        their pairs at tile 256 and 25% at 64."""
        def pick(tile: int) -> int:
            while tile // 2 >= MIN_ATTENTION_TILE and tile * ROW_TILES > length:
                tile //= 2
            return tile

        return pick(self.attn_q_tile), pick(self.attn_kv_tile)


MIN_ATTENTION_TILE = 64  # below this the kernel's per-tile overhead outweighs the pairs it skips
ROW_TILES = 8  # tiles per row that `ModelRuntime.attention_tiles` aims for


def runtime_options(source: ModelRuntime) -> dict:
    """The `ModelRuntime` fields of `source` (a config section or a ModelConfig) as keyword arguments."""
    return {f.name: getattr(source, f.name) for f in dataclasses.fields(ModelRuntime)}


@dataclasses.dataclass(frozen=True)
class ModelConfig(ModelRuntime):
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    # Block diffusion: SDAR checkpoints do not always record it; None = not recorded.
    block_size: int | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})"
            )
        if self.param_dtype not in DTYPES or self.dtype not in DTYPES:
            raise ModelConfigError(f"param_dtype/dtype must be one of {DTYPES}, got {self.param_dtype}/{self.dtype}")
        if self.remat not in REMAT_POLICIES:
            raise ModelConfigError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelConfigError(
                f"rope_scaling type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
            )

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- presets -------------------------------------------------------------------------
    @classmethod
    def tiny(cls, vocab_size: int = 512, **overrides) -> "ModelConfig":
        """A 2-layer model for tests and the CPU demo."""
        base = dict(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            rope_theta=10000.0,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            block_size=4,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def sdar_8b(cls, **overrides) -> "ModelConfig":
        """JetLM/SDAR-8B-Chat (Qwen3-8B shape), from its config.json fields in `presets`."""
        return cls._from_preset("sdar_8b", overrides)

    @classmethod
    def sdar_1_7b(cls, **overrides) -> "ModelConfig":
        """JetLM/SDAR-1.7B-Chat (Qwen3-1.7B shape, tied embeddings)."""
        return cls._from_preset("sdar_1_7b", overrides)

    @classmethod
    def _from_preset(cls, name: str, overrides: dict) -> "ModelConfig":
        return dataclasses.replace(cls.from_hf_dict(HF_PRESETS[name]), **overrides)

    # ---- HF config.json ------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **runtime) -> "ModelConfig":
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelConfigError(
                f"unsupported model_type {model_type!r} in config.json; gtpo_jax supports {SUPPORTED_MODEL_TYPES} "
                "(SDAR block-diffusion checkpoints and plain Qwen3 decoders)"
            )
        missing = [f for f in _REQUIRED_HF_FIELDS if f not in hf]
        if missing:
            raise ModelConfigError(f"config.json is missing required field(s) {missing}")
        if hf.get("attention_bias"):
            raise ModelConfigError("attention_bias=true is not supported (SDAR/Qwen3 projections have no bias)")
        if hf.get("use_sliding_window"):
            raise ModelConfigError("use_sliding_window=true is not supported for block-diffusion models")
        if hf.get("hidden_act", "silu") != "silu":
            raise ModelConfigError(f"hidden_act {hf['hidden_act']!r} is not supported (SwiGLU uses silu)")
        heads = hf["num_attention_heads"]
        rope_theta, rope_scaling = hf.get("rope_theta", 10000.0), hf.get("rope_scaling")
        if isinstance(hf.get("rope_parameters"), dict):  # transformers >= 5 writes this form
            rope_params = dict(hf["rope_parameters"])
            rope_theta = rope_params.pop("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = rope_params
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            block_size=hf.get("block_size"),
            **runtime,
        )

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike, **runtime) -> "ModelConfig":
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise ModelConfigError(f"{path} has no config.json; is it an HF model directory?")
        return cls.from_hf_dict(read_json_file(cfg_path), **runtime)

    def to_hf_dict(self, base: dict[str, Any] | None = None) -> dict[str, Any]:
        """HF fields for this architecture; fields of `base` (the source config) are kept."""
        out = dict(base or {})
        out.setdefault("model_type", "sdar")
        out.setdefault("architectures", ["SDARForCausalLM" if out["model_type"] == "sdar" else "Qwen3ForCausalLM"])
        out.update(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
        )
        if isinstance(out.get("rope_parameters"), dict):
            out["rope_parameters"] = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        else:
            out.update(rope_theta=self.rope_theta, rope_scaling=self.rope_scaling)
        out.setdefault("hidden_act", "silu")
        out.setdefault("attention_bias", False)
        out.setdefault("use_sliding_window", False)
        out.setdefault("torch_dtype", self.param_dtype)
        if self.block_size is not None:
            out["block_size"] = self.block_size
        return out

    def check_block_size(self, block_size: int, source: str = "the checkpoint") -> None:
        if self.block_size is not None and self.block_size != block_size:
            raise ModelConfigError(
                f"block_size {block_size} disagrees with {source}'s block_size {self.block_size}; "
                f"set block_size={self.block_size} (the model was trained with it) or remove it from config.json"
            )
