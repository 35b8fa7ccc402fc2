"""The tiny BPE tokenizer of the CPU demo, trained on the synthetic task's text. It lives apart from
`data.tokenizer` (which the synthetic task imports for its prompt wording) and from `data.synthetic`
(whose examples are its corpus), so that neither imports the other both ways."""

from __future__ import annotations

import os

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from gtpo_jax.data.synthetic import synthetic_examples
from gtpo_jax.data.tokenizer import CHAT_TEMPLATE, MASK_TOKEN, SPECIAL_TOKENS, chat_prompt


def _tiny_corpus() -> list[str]:
    texts = [chat_prompt("What is 12 + 34?"), "The answer is", "<think></think>"]
    for ex in synthetic_examples(500, seed=12345, digits=3):
        texts.append(ex.question + " " + ex.response)
    texts.append("".join(chr(c) for c in range(32, 127)))  # every printable character is encodable
    return texts


def build_tiny_tokenizer(out_dir: str, vocab_size: int = 192) -> str:
    """Train a small BPE (digits always single tokens) on the synthetic task's text and save it
    as an HF fast tokenizer with the SDAR special tokens. Deterministic; returns `out_dir`."""
    if os.path.isfile(os.path.join(out_dir, "tokenizer.json")):
        return out_dir
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.Split(Regex(r"\s|[^\w\s]"), behavior="isolated")]
    )
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=[chr(c) for c in range(32, 127)] + ["\n"])
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", mask_token=MASK_TOKEN,
        additional_special_tokens=["<|im_start|>", "<think>", "</think>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir
