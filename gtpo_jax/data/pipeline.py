"""Grain pipelines: tokenized SFT samples in seeded, per-epoch shuffled order, sharded per host,
with an iterator state saved in checkpoints (exact resume); RL prompts from a resumable cursor."""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterator, Sequence

import grain
import numpy as np

from gtpo_jax.data.records import RecordError, RLQuestion, SFTRecord, read_rl_records, read_sft_records
from gtpo_jax.data.tokenizer import chat_prompt, stop_token_ids

log = logging.getLogger("gtpo_jax")


@dataclasses.dataclass
class SFTSample:
    prompt_ids: np.ndarray
    response_ids: np.ndarray
    status: str = "ok"  # ok | truncated | skipped


class SFTData:
    """Batches of (prompt_ids, response_ids) for the SFT trainer.

    Over-length samples (prompt + response > max_len) are truncated (response cut) or skipped
    per `over_length`; a prompt that alone exceeds max_len is an error unless
    `prompt_too_long == "skip"`. Every truncation and skip is counted in the batch stats.

    In a multi-process run every process reads the same global stream (shard 0 of 1, the
    default), so that all of them build the same global batch, each feeding only its devices'
    rows, and one iterator state (process 0's, in the checkpoint) resumes them all; the data order
    is then the same for any number of processes. `shard_index/shard_count` split the records
    for jobs that really are independent per host.
    """

    def __init__(
        self,
        files: Sequence[str],
        tokenizer,
        *,
        max_len: int,
        over_length: str = "truncate",
        prompt_too_long: str = "error",
        seed: int = 0,
        epochs: int = 0,
        shard_index: int = 0,
        shard_count: int = 1,
    ):
        records: list[SFTRecord] = [r for f in files for r in read_sft_records(f)]
        self.tokenizer, self.max_len = tokenizer, max_len
        self.over_length, self.prompt_too_long = over_length, prompt_too_long
        ds = grain.MapDataset.source(records)[shard_index::shard_count]
        ds = ds.shuffle(seed=seed).repeat(epochs or None)
        # Tokenized in the caller's thread, on demand: Grain's default (16 threads reading 500 samples
        # ahead) contends for the GIL and the cores with the training step and costs 3x the CPU time
        # on in-memory records; the order and the iterator state are the same.
        self._dataset = ds.map(self._tokenize).to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        self._iter = iter(self._dataset)
        self.counters = {"truncated": 0, "skipped": 0, "seen": 0}
        # Every response ends with the stop tokens (SDAR: <|im_end|><|endoftext|>), so that the model
        # learns to stop; the prompt goes through the tokenizer's own chat template.
        self.stop_ids = stop_token_ids(tokenizer)
        if not self.stop_ids:
            raise RecordError("the tokenizer has no stop token (<|im_end|>, <|endoftext|> or an eos token): SFT "
                              "responses would train without one; use the model's own tokenizer")
        if not getattr(tokenizer, "chat_template", None):
            raise RecordError("the tokenizer has no chat template, which SFT records are rendered with; use the "
                              "model's own tokenizer (its tokenizer_config.json or chat_template.jinja)")
        self._stop_texts = [tokenizer.convert_ids_to_tokens(i) for i in self.stop_ids]

    def _tokenize(self, record: SFTRecord) -> SFTSample:
        prompt_text, response_text = self._texts(record)
        prompt = np.asarray(self.tokenizer.encode(prompt_text, add_special_tokens=False), np.int32)
        response = np.asarray(self.tokenizer.encode(response_text, add_special_tokens=False) + self.stop_ids, np.int32)
        if len(prompt) >= self.max_len:
            if self.prompt_too_long == "error":
                raise RecordError(
                    f"a prompt has {len(prompt)} tokens, more than data.max_len={self.max_len} "
                    f"(prompt starts {record.prompt[:60]!r}); raise data.max_len or set data.prompt_too_long=skip"
                )
            return SFTSample(prompt, response, "skipped")
        if len(prompt) + len(response) > self.max_len:
            if self.over_length == "skip":
                return SFTSample(prompt, response, "skipped")
            return SFTSample(prompt, response[: self.max_len - len(prompt)], "truncated")
        return SFTSample(prompt, response)

    def _texts(self, record: SFTRecord) -> tuple[str, str]:
        """(prompt, response) text: the prompt rendered by the chat template up to the assistant's
        turn; the response without its stop tokens (the caller appends them as ids)."""
        render = self.tokenizer.apply_chat_template
        if not record.messages:
            prompt = render([{"role": "user", "content": record.prompt}], tokenize=False, add_generation_prompt=True)
            return prompt, record.response
        turns = [{"role": role, "content": content} for role, content in record.messages]
        prompt = render(turns[:-1], tokenize=False, add_generation_prompt=True)
        full = render(turns, tokenize=False)
        if not full.startswith(prompt):
            raise RecordError(
                "the tokenizer's chat template renders a conversation differently from its prompt part "
                f"(conversation starts {full[:80]!r}); this template cannot split prompt and response"
            )
        response = full[len(prompt):].rstrip()
        while any(response.endswith(t) for t in self._stop_texts):  # the template's own end of turn
            response = response[: -len(next(t for t in self._stop_texts if response.endswith(t)))].rstrip()
        return prompt, response

    def batches(self, batch_size: int) -> Iterator[tuple[list[tuple[np.ndarray, np.ndarray]], dict]]:
        """Yields (samples, stats); stats count what was truncated or skipped to fill this batch."""
        while True:
            batch, skipped, truncated = [], 0, 0
            while len(batch) < batch_size:
                try:
                    sample = next(self._iter)
                except StopIteration:
                    if not batch:
                        return
                    break
                self.counters["seen"] += 1
                if sample.status == "skipped":
                    skipped += 1
                    continue
                truncated += sample.status == "truncated"
                batch.append((sample.prompt_ids, sample.response_ids))
            self.counters["skipped"] += skipped
            self.counters["truncated"] += truncated
            if skipped or truncated:
                log.info("data: %d over-length sample(s) skipped, %d truncated in this batch (totals %s)",
                         skipped, truncated, self.counters)
            yield batch, {"skipped_samples": skipped, "truncated_samples": truncated}

    def get_state(self) -> dict:
        return {"iterator": self._iter.get_state(), "counters": dict(self.counters)}

    def set_state(self, state: dict) -> None:
        self._iter.set_state(state["iterator"])
        self.counters = dict(state["counters"])


@dataclasses.dataclass
class RLPrompt:
    index: int
    question: str
    ground_truth: str
    prompt_ids: list[int]


class RLPromptSource:
    """Questions in a seeded per-epoch shuffled order (or file order: `shuffle=False`), drawn by a
    resumable integer cursor."""

    def __init__(self, questions: Sequence[RLQuestion], tokenizer, *, seed: int = 0, think: bool = False,
                 shuffle: bool = True, shard_index: int = 0, shard_count: int = 1):
        self.questions = list(questions)[shard_index::shard_count]
        if not self.questions:
            raise RecordError("the RL prompt set is empty for this process; add questions or use fewer processes")
        self.tokenizer, self.seed, self.think, self.shuffle = tokenizer, seed, think, shuffle
        self.cursor = 0

    @classmethod
    def from_files(cls, files: Sequence[str], tokenizer, **kwargs) -> "RLPromptSource":
        questions = [q for f in files for q in read_rl_records(f)]
        return cls([dataclasses.replace(q, index=i) for i, q in enumerate(questions)], tokenizer, **kwargs)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.questions))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.questions))

    def draw(self, k: int) -> list[RLPrompt]:
        out = []
        for _ in range(k):
            epoch, offset = divmod(self.cursor, len(self.questions))
            q = self.questions[self._order(epoch)[offset]]
            ids = self.tokenizer.encode(chat_prompt(q.question, think=self.think), add_special_tokens=False)
            out.append(RLPrompt(q.index, q.question, q.ground_truth, ids))
            self.cursor += 1
        return out

    def get_state(self) -> dict:
        return {"cursor": self.cursor}

    def set_state(self, state: dict) -> None:
        self.cursor = int(state["cursor"])
