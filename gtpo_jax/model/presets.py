"""config.json fields of the released SDAR checkpoints, so that a model can be planned (and a
random one built) without its weights on disk.

SDAR-8B-Chat and SDAR-1.7B-Chat are Qwen3-8B- and Qwen3-1.7B-shaped decoders (the SDAR
report continues training Qwen3 bases); only the architectural fields are kept here — the
ones `ModelConfig.from_hf_dict` reads. Block size 4 is the released models' decoding block.
"""

from __future__ import annotations

SDAR_8B_CHAT: dict = {
    "architectures": ["SDARForCausalLM"],
    "model_type": "sdar",
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "attention_bias": False,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "torch_dtype": "bfloat16",
    "block_size": 4,
}

SDAR_1_7B_CHAT: dict = {
    **SDAR_8B_CHAT,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "tie_word_embeddings": True,
}

# name (as in `model.preset`) -> HF config.json fields
HF_PRESETS: dict[str, dict] = {"sdar_8b": SDAR_8B_CHAT, "sdar_1_7b": SDAR_1_7B_CHAT}
