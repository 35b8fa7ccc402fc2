"""SFT record formats: raw {prompt, response} and {messages}, both rendered with the tokenizer's
chat template and ending in the stop tokens; data in the old pre-rendered form is refused."""

from __future__ import annotations

import json
import threading

import pytest

from gtpo_jax.data.pipeline import SFTData
from gtpo_jax.data.records import RecordError, read_sft_records
from gtpo_jax.data.tiny_tokenizer import build_tiny_tokenizer
from gtpo_jax.data.tokenizer import load_tokenizer, qwen3_tokenizer_dir


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    return load_tokenizer(build_tiny_tokenizer(str(tmp_path_factory.mktemp("tok"))))


def samples(path, tok):
    data = SFTData([path], tok, max_len=512)
    return [data._tokenize(r) for r in read_sft_records(path)]


def ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


def test_prompt_response_record_gets_the_chat_template_and_stop_tokens(tmp_path, tiny_tok):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "What is 2 + 2?", "response": "It is \\boxed{4}."}])
    (s,) = samples(path, tiny_tok)
    # Written out by hand: the Qwen chat format of one user turn, then the assistant's turn.
    assert s.prompt_ids.tolist() == ids(tiny_tok, "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")
    end = [tiny_tok.convert_tokens_to_ids("<|im_end|>"), tiny_tok.convert_tokens_to_ids("<|endoftext|>")]
    assert s.response_ids.tolist() == ids(tiny_tok, "It is \\boxed{4}.") + end


def test_messages_record_is_rendered_by_the_tokenizer_template(tmp_path, tiny_tok):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1 + 1?"},
                    {"role": "assistant", "content": "2"}, {"role": "user", "content": "And 2 + 2?"},
                    {"role": "assistant", "content": "\\boxed{4}"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation}])
    (s,) = samples(path, tiny_tok)
    prompt = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1 + 1?<|im_end|>\n"
              "<|im_start|>assistant\n2<|im_end|>\n<|im_start|>user\nAnd 2 + 2?<|im_end|>\n<|im_start|>assistant\n")
    assert s.prompt_ids.tolist() == ids(tiny_tok, prompt)
    assert s.response_ids.tolist() == ids(tiny_tok, "\\boxed{4}<|im_end|><|endoftext|>")


def test_messages_with_the_real_qwen3_template_end_in_the_stop_tokens(tmp_path):
    tok = load_tokenizer(qwen3_tokenizer_dir())
    conversation = [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "\\boxed{7}"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation}])
    (s,) = samples(path, tok)
    assert tok.decode(s.prompt_ids).endswith("What is 3 + 4?<|im_end|>\n<|im_start|>assistant\n")
    response = tok.decode(s.response_ids)
    assert response.endswith("\\boxed{7}<|im_end|><|endoftext|>") and response.count("<|im_end|>") == 1


@pytest.mark.parametrize("row, message", [
    ({"prompt": "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n", "response": "A"},
     r"chat\.jsonl:1: field 'prompt' holds chat markup"),
    ({"prompt": "Q", "response": "A<|im_end|><|endoftext|>"}, r"chat\.jsonl:1: field 'response' holds chat markup"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
                   {"role": "user", "content": "more?"}]}, r"chat\.jsonl:1: the last message must be the assistant's"),
    ({"messages": [{"role": "user", "content": "Q"}]}, r"at least two"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "A"}]}, r"messages\[0\] must be an object"),
])
def test_records_that_would_train_wrongly_are_errors(tmp_path, row, message):
    with pytest.raises(RecordError, match=message):
        read_sft_records(write_jsonl(tmp_path / "chat.jsonl", [row]))


def test_samples_are_tokenized_on_demand_in_the_callers_thread(tmp_path, tiny_tok):
    """No reader threads running ahead: on the CPU demo they took 3x the CPU time of tokenizing on
    demand and competed with the training step for the cores (and the GIL)."""
    rows = [{"prompt": f"What is {i} + {i}?", "response": f"\\boxed{{{2 * i}}}"} for i in range(40)]
    data = SFTData([write_jsonl(tmp_path / "sft.jsonl", rows)], tiny_tok, max_len=512)
    batch, _ = next(data.batches(4))
    assert len(batch) == 4
    assert data.counters["seen"] == 4
    readers = [t.name for t in threading.enumerate() if t.name.startswith("grain")]
    assert not readers, readers
