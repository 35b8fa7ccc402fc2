"""Reading SFT and RL records from JSON lists, JSONL or Parquet, with errors that say where."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Iterator

EVAL_SETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval_sets")
BUILTIN_PREFIX = "builtin:"  # `builtin:math500.jsonl` names a file shipped in EVAL_SETS_DIR
SFT_FIELDS = ("prompt", "response")
# Chat markup that a raw SFT text must not carry: the template and stop tokens are added for it.
CHAT_MARKUP = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
RL_FIELDS = ("question", "ground_truth_answer")


class RecordError(ValueError):
    """Bad input data; the message names the file, the line or record, and the field."""


@dataclasses.dataclass(frozen=True)
class SFTRecord:
    """One SFT example: raw `prompt` and `response` texts, or a conversation (`messages`, as
    (role, content) pairs, the last one the assistant's turn to learn). The chat template and
    the stop tokens are added when tokenizing (`gtpo_jax.data.pipeline`)."""

    prompt: str = ""
    response: str = ""
    messages: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class RLQuestion:
    index: int
    question: str
    ground_truth: str


def resolve_data_path(path: str) -> str:
    """The file a config names: `builtin:<name>` is one of the evaluation sets shipped with the
    package (gtpo_jax/data/eval_sets), anything else a path as given."""
    if path.startswith(BUILTIN_PREFIX):
        return os.path.join(EVAL_SETS_DIR, path[len(BUILTIN_PREFIX):])
    return path


def check_data_files(paths: Iterable[str], what: str = "data file") -> None:
    """One error naming every missing input file, raised before any model or engine is built."""
    missing = [p for p in paths if not os.path.isfile(resolve_data_path(p))]
    if missing:
        shipped = ", ".join(sorted(BUILTIN_PREFIX + n for n in os.listdir(EVAL_SETS_DIR) if n.endswith(".jsonl")))
        raise RecordError(
            f"{what}(s) not found: {', '.join(missing)} (relative paths are read from {os.getcwd()}); "
            f"fix the path, or use one of the shipped evaluation sets: {shipped}"
        )


def _iter_raw(path: str) -> Iterator[tuple[str, object]]:
    """(location, record) pairs; location is 'file:line' for JSONL, 'file[record i]' otherwise."""
    path = resolve_data_path(path)
    if not os.path.isfile(path):
        raise RecordError(f"data file {path} does not exist")
    lower = path.lower()
    if lower.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq  # optional: the `parquet` extra
        except ImportError:
            raise RecordError(f"{path}: reading Parquet needs pyarrow: pip install -e '.[parquet]' "
                              "(or convert the file to JSONL)") from None

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}[record {i}]", row
    elif lower.endswith(".jsonl"):
        with open(path, "rb") as f:  # bytes: a bad UTF-8 sequence is then reported with its line
            for line_no, raw in enumerate(f, start=1):
                line = _utf8(raw, f"{path}:{line_no}")
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{line_no}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise RecordError(f"{path}:{line_no}: malformed JSON ({e.msg} at column {e.colno})") from None
    elif lower.endswith(".json"):
        with open(path, "rb") as f:
            raw = f.read()
        try:
            data = json.loads(_utf8(raw, path, whole_file=True))
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, list):
            raise RecordError(f"{path}: a .json data file must hold a list of records")
        for i, row in enumerate(data):
            yield f"{path}[record {i}]", row
    else:
        raise RecordError(f"{path}: unsupported data format; use .jsonl, .json (a list) or .parquet")


def _utf8(raw: bytes, location: str, *, whole_file: bool = False) -> str:
    """`raw` (a line, or a whole file) decoded as UTF-8, or an error naming where the first bad byte is."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if whole_file:
            line = raw.count(b"\n", 0, e.start) + 1
            where = f"line {line}, byte offset {e.start}"
        else:
            where = f"byte {e.start + 1} of the line"
        raise RecordError(f"{location}: not valid UTF-8 ({where}: {e.reason}, byte 0x{raw[e.start]:02x}); "
                          "data files must be UTF-8 (re-encode it, e.g. iconv -f latin1 -t utf-8)") from None


def _fields(location: str, row, names: tuple[str, ...]) -> list[str]:
    if not isinstance(row, dict):
        raise RecordError(f"{location}: expected an object with fields {list(names)}, got {type(row).__name__}")
    out = []
    for name in names:
        if name not in row:
            raise RecordError(f"{location}: missing field {name!r} (records need {list(names)})")
        value = row[name]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and name == "ground_truth_answer":
            value = str(value)
        if not isinstance(value, str):
            raise RecordError(f"{location}: field {name!r} must be a string, got {type(value).__name__}")
        out.append(value)
    return out


def _sft_record(location: str, row) -> SFTRecord:
    if isinstance(row, dict) and "messages" in row:
        return SFTRecord(messages=_messages(location, row["messages"]))
    prompt, response = _fields(location, row, SFT_FIELDS)
    for name, text in (("prompt", prompt), ("response", response)):
        markup = [m for m in CHAT_MARKUP if m in text]
        if markup:
            raise RecordError(
                f"{location}: field {name!r} holds chat markup {markup}; give the raw text: the model's chat "
                "template is applied to the prompt and the stop tokens are appended to the response when "
                "tokenizing (or give the conversation as {\"messages\": [...]})"
            )
    return SFTRecord(prompt, response)


def _messages(location: str, messages) -> tuple[tuple[str, str], ...]:
    if not isinstance(messages, list) or len(messages) < 2:
        raise RecordError(f"{location}: 'messages' must be a list of at least two {{role, content}} turns")
    out = []
    for i, turn in enumerate(messages):
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            raise RecordError(f"{location}: messages[{i}] must be an object with string 'role' and 'content'")
        out.append((turn["role"], turn["content"]))
    if out[-1][0] != "assistant":
        raise RecordError(f"{location}: the last message must be the assistant's (the response that is trained), "
                          f"got role {out[-1][0]!r}")
    return tuple(out)


def read_sft_records(path: str) -> list[SFTRecord]:
    records = [_sft_record(loc, row) for loc, row in _iter_raw(path)]
    if not records:
        raise RecordError(f"{path}: no records; an SFT dataset needs {{prompt, response}} or {{messages}} records")
    return records


def read_rl_records(path: str) -> list[RLQuestion]:
    records = [RLQuestion(i, *_fields(loc, row, RL_FIELDS)) for i, (loc, row) in enumerate(_iter_raw(path))]
    if not records:
        raise RecordError(f"{path}: no records; an RL dataset needs {{question, ground_truth_answer}} records")
    return records
