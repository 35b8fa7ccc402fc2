"""The SFT loss against the same masked copies scored by transformers' Qwen3 (4D block mask)."""

import numpy as np
import pytest
import torch
from flax import nnx

from conftest import block_causal_additive_mask, write_tiny_hf_checkpoint
from gtpo_jax.config import Config
from gtpo_jax.data.tokenizer import TokenIds
from gtpo_jax.hf_io import load_hf_model
from gtpo_jax.trainers.sft import build_sft_batch, sft_layouts, sft_loss_fn

B, MASK, PAD = 4, 1, 2


def reference_loss(hf_model, samples, layouts, post_num):
    per_sample = []
    for (prompt, response), lay in zip(samples, layouts):
        full = list(prompt) + list(response)
        full += [PAD] * (-(-(len(full) + post_num) // B) * B - len(full))
        nll = []
        for copy in lay.copies:
            j = copy.block
            block = np.array(full[j * B : (j + 1) * B])
            masked = copy.tokens == MASK
            # the copy is the clean block with masked slots replaced, targets = masked slots
            assert np.array_equal(copy.tokens[~masked], block[~masked])
            assert np.array_equal(np.nonzero(copy.targets >= 0)[0], np.nonzero(masked)[0])
            seq = full[: j * B] + copy.tokens.tolist()
            mask = torch.from_numpy(block_causal_additive_mask(len(seq), B))[None, None]
            with torch.no_grad():
                logits = hf_model(input_ids=torch.tensor([seq]), attention_mask=mask).logits[0].double()
            logp = torch.log_softmax(logits, -1).numpy()
            for slot in np.nonzero(masked)[0]:
                nll.append(-logp[j * B + slot, block[slot]])
        if nll:
            per_sample.append(np.mean(nll))
    return float(np.mean(per_sample))


@pytest.mark.parametrize("mask_sampling,copies,post_num", [("per_block", 1, 0), ("per_token", 2, 3)])
def test_sft_loss_matches_transformers(tmp_path, mask_sampling, copies, post_num):
    hf_model = write_tiny_hf_checkpoint(tmp_path, tie=False, attn_implementation="eager")
    model = load_hf_model(tmp_path)
    rng = np.random.default_rng(0)
    samples = [
        (rng.integers(3, 160, p).tolist(), rng.integers(3, 160, r).tolist())
        for p, r in [(5, 7), (8, 9), (10, 4), (3, 12)]
    ]
    cfg = Config(stage="sft", block_size=B)
    cfg.data.synthetic = True
    cfg.data.max_len = 32
    cfg.masking.mask_sampling = mask_sampling
    cfg.masking.num_noisy_copies = copies
    cfg.masking.post_num = post_num
    cfg.train.micro_batches = 2
    cfg.train.vocab_chunk = 16
    ids = TokenIds(block_size=cfg.block_size, mask_id=MASK, pad_id=PAD, stop_ids=())
    layouts = sft_layouts(samples, cfg, ids, step=0)
    arrays, stats = build_sft_batch(layouts, cfg)
    assert arrays["tokens"].shape[0] == 2  # two micro-batches
    loss_fn = sft_loss_fn(16)
    ours = sum(float(loss_fn(model, {k: v[i] for k, v in arrays.items()})[0]) for i in range(2))
    expected = reference_loss(hf_model, samples, layouts, post_num)
    assert ours == pytest.approx(expected, abs=1e-5)
