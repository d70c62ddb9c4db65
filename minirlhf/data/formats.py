"""JSONL data formats for every stage, validated at load time.

One record per line; each loader returns plain Python values: pretraining texts, SFT conversations,
preference pairs, RL prompts. Design choices:
- Validate everything up front. A bad record raises `DataError`, a one-line message naming the file,
  line and field (`data/sft.jsonl:12: field 'conversations[1].role': unknown role 'bot' ...`), so a run
  fails in the first second rather than an hour in.
- Accept the common public shapes instead of asking for conversion scripts: MiniMind `conversations`,
  OpenAI-style `messages`, prompt/chosen/rejected as strings or message lists (MiniMind, TRL), and
  Anthropic hh-rlhf transcripts.
- A path may be a .jsonl file, a gzipped .jsonl.gz file, a directory of them (read in sorted order), or a
  Hugging Face `datasets` dataset saved with `save_to_disk` (`path` or `path:split` for a DatasetDict;
  records are numbered from 1 in place of line numbers).
- Preference pairs that carry no signal (chosen == rejected, or an empty response) are skipped, not
  fatal; the reasons are handed back so the caller can report how many.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .task import MAX_ANSWER_CHARS, reference_number

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}
ROLES = ("system", "user", "assistant")
_Where = tuple[Path, int]  # (file, line) of the record being validated


class DataError(ValueError):
    """One-line, user-facing error: `<file>:<line>: field '<field>': <problem>`."""

    def __init__(self, path: str | os.PathLike, line: int | None, field: str | None, problem: str):
        self.path, self.line, self.field, self.problem = path, line, field, problem
        where = f"{path}" if line is None else f"{path}:{line}"
        what = problem if field is None else f"field '{field}': {problem}"
        super().__init__(f"{where}: {what}")

    def __reduce__(self):  # keep the error picklable (e.g. across DataLoader worker processes)
        return DataError, (self.path, self.line, self.field, self.problem)


# ----------------------------------------------------------------------------------------------------
# Reading


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[Path, int, dict]]:
    """Yield (file, line_number, object) for each non-blank line of a .jsonl / .jsonl.gz file, or of
    every such file in a directory (sorted by name). Raises DataError for a missing path, an empty
    directory, non-UTF-8 bytes, invalid JSON, a line that is not a JSON object, or a file with no records."""
    saved = _saved_dataset(str(path))
    if saved is not None:
        yield from _read_saved_dataset(*saved)
        return
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith((".jsonl", ".jsonl.gz")))
        if not files:
            raise DataError(path, None, None, "directory contains no .jsonl or .jsonl.gz files")
    elif path.is_file():
        files = [path]
    elif path.exists():
        raise DataError(path, None, None, "not a regular file or directory")
    else:
        raise DataError(path, None, None, "file not found")
    for file in files:
        yield from _read_file(file)


def _saved_dataset(spec: str) -> tuple[Path, str | None] | None:
    """(dir, split) if `spec` names a `datasets` save_to_disk directory (`dir` or `dir:split`), else None."""
    directory, _, split = spec.rpartition(":") if ":" in spec and not Path(spec).exists() else (spec, "", "")
    directory = Path(directory)
    markers = ("state.json", "dataset_info.json", "dataset_dict.json")
    if directory.is_dir() and any((directory / m).is_file() for m in markers):
        return directory, split or None
    return None


def _read_saved_dataset(directory: Path, split: str | None) -> Iterator[tuple[Path, int, dict]]:
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise DataError(directory, None, None, "a saved `datasets` dataset needs `pip install datasets`") from None
    try:
        data = load_from_disk(str(directory))
    except Exception as e:  # noqa: BLE001 - datasets raises several types for damaged dirs
        raise DataError(directory, None, None, f"cannot load the saved dataset ({str(e).splitlines()[0]})") from None
    if isinstance(data, DatasetDict):
        name = split or ("train" if "train" in data else None)
        if name not in data:
            raise DataError(directory, None, None, f"name a split as {directory}:<split>; it has {sorted(data)}")
        data = data[name]
    if len(data) == 0:
        raise DataError(directory, None, None, "no records (the dataset is empty)")
    for index, record in enumerate(data, 1):
        yield directory, index, dict(record)


def _read_file(file: Path) -> Iterator[tuple[Path, int, dict]]:
    opener = gzip.open if file.name.endswith(".gz") else open
    n_records = 0
    try:
        with opener(file, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    problem = f"not valid UTF-8 (byte {e.start}); save the file as UTF-8"
                    raise DataError(file, lineno, None, problem) from None
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text.rstrip())
                except json.JSONDecodeError as e:
                    raise DataError(file, lineno, None, f"invalid JSON: {e.msg} (column {e.colno})") from None
                except RecursionError:
                    raise DataError(file, lineno, None, "invalid JSON: nested too deeply") from None
                if not isinstance(obj, dict):
                    raise DataError(file, lineno, None, f"expected a JSON object, got {_type_name(obj)}")
                if "\\ud" in text.lower():  # a \uXXXX escape may encode half a surrogate pair: not text
                    _check_unicode(obj, file, lineno)
                n_records += 1
                yield file, lineno, obj
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(file, None, None, f"cannot read: {e}") from None
    if n_records == 0:
        raise DataError(file, None, None, "no records (the file is empty)")


def _check_unicode(record: dict, file: Path, lineno: int) -> None:
    """Refuse a record whose strings hold a lone surrogate (e.g. "\\ud800"): valid JSON, but not Unicode text
    that a tokenizer can encode."""
    for key, value in record.items():
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(file, lineno, key, "holds a lone surrogate escape (such as \\ud800), which is not "
                                               "valid Unicode text") from None


# ----------------------------------------------------------------------------------------------------
# Field validation


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _get_str(rec: dict, key: str, where: _Where, field: str, allow_empty: bool = False) -> str:
    if key not in rec:
        raise DataError(*where, field, f"missing (the record has keys {sorted(rec)})")
    value = rec[key]
    if not isinstance(value, str):
        raise DataError(*where, field, f"expected a string, got {_type_name(value)}")
    if not allow_empty and not value.strip():
        raise DataError(*where, field, "empty string")
    return value


def _messages(value: object, where: _Where, field: str, empty_last_ok: bool = False) -> list[Message]:
    """Validate a list of {"role", "content"} objects; extra keys are dropped."""
    if not isinstance(value, list):
        raise DataError(*where, field, f"expected a list of messages, got {_type_name(value)}")
    if not value:
        raise DataError(*where, field, "empty list of messages")
    out = []
    for i, m in enumerate(value):
        f = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise DataError(*where, f, f"expected an object with 'role' and 'content', got {_type_name(m)}")
        role = _get_str(m, "role", where, f"{f}.role")
        if role not in ROLES:
            raise DataError(*where, f"{f}.role", f"unknown role {role!r} (expected {', '.join(ROLES)})")
        allow_empty = empty_last_ok and i == len(value) - 1
        content = _get_str(m, "content", where, f"{f}.content", allow_empty)
        out.append({"role": role, "content": content})
    return out


def _prompt(value: object, where: _Where, field: str) -> list[Message]:
    """A prompt is a non-empty string (one user turn) or a message list that ends with a user turn."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(*where, field, "empty string")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise DataError(*where, field, f"expected a string or a list of messages, got {_type_name(value)}")
    messages = _messages(value, where, field)
    _check_ends_with_user(messages, where, field)
    return messages


def _check_ends_with_user(messages: list[Message], where: _Where, field: str) -> None:
    if not messages or messages[-1]["role"] != "user":
        raise DataError(*where, field, "the prompt must end with a user turn")


# ----------------------------------------------------------------------------------------------------
# Loaders


@dataclass(frozen=True)
class PreferencePair:
    prompt: list[Message]  # conversation so far, ends with a user turn
    chosen: str  # assistant response text
    rejected: str


@dataclass(frozen=True)
class PromptExample:
    prompt: list[Message]
    answer: str | None = None


def load_pretrain(path: str | os.PathLike) -> list[str]:
    """Records `{"text": str}` -> list of texts."""
    return [_get_str(rec, "text", (file, line), "text") for file, line, rec in read_jsonl(path)]


def load_sft(path: str | os.PathLike) -> list[list[Message]]:
    """Records `{"conversations": [...]}` (MiniMind) or `{"messages": [...]}` -> conversations, each with
    at least one assistant turn."""
    out = []
    for file, line, rec in read_jsonl(path):
        key = "messages" if "messages" in rec and "conversations" not in rec else "conversations"
        if key not in rec:
            problem = f"missing; expected 'conversations' or 'messages' (the record has keys {sorted(rec)})"
            raise DataError(file, line, key, problem)
        messages = _messages(rec[key], (file, line), key)
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(file, line, key, "no assistant turn; a conversation needs a response to train on")
        out.append(messages)
    return out


def load_preferences(path: str | os.PathLike, skipped: list[str] | None = None) -> list[PreferencePair]:
    """Load preference pairs in any of three shapes:
    (a) {"prompt": str | messages, "chosen": str, "rejected": str};
    (b) {"chosen": messages, "rejected": messages, "prompt"?: ...}: the messages shared by both are the
        prompt (after `prompt`, if given) and the final assistant message of each is the response;
    (c) hh-rlhf transcripts {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}: the prompt
        is the common prefix up to the last "\\n\\nAssistant:", the responses are what follows it.
    Pairs with chosen == rejected or an empty response are skipped; a "<file>:<line>: skipped: <why>"
    line is appended to `skipped` for each. Raises DataError if every pair is skipped."""
    pairs, reasons = [], []
    for file, line, rec in read_jsonl(path):
        prompt, chosen, rejected = _parse_pair(rec, (file, line))
        reason = None
        if not chosen.strip():
            reason = "empty chosen response"
        elif not rejected.strip():
            reason = "empty rejected response"
        elif chosen == rejected:
            reason = "chosen equals rejected"
        if reason:
            reasons.append(f"{file}:{line}: skipped: {reason}")
        else:
            pairs.append(PreferencePair(prompt, chosen, rejected))
    if skipped is not None:
        skipped.extend(reasons)
    if not pairs:
        raise DataError(path, None, None, f"all {len(reasons)} pairs were skipped (first: {reasons[0]})")
    return pairs


def _parse_pair(rec: dict, where: _Where) -> tuple[list[Message], str, str]:
    for key in ("chosen", "rejected"):
        if key not in rec:
            raise DataError(*where, key, f"missing (the record has keys {sorted(rec)})")
        if not isinstance(rec[key], (str, list)):
            problem = f"expected a string or a list of messages, got {_type_name(rec[key])}"
            raise DataError(*where, key, problem)
    chosen, rejected = rec["chosen"], rec["rejected"]
    if type(chosen) is not type(rejected):
        raise DataError(*where, "rejected", "chosen and rejected must both be strings or both message lists")
    if isinstance(chosen, list):
        return _parse_message_pair(rec, where)
    if "prompt" not in rec and "\n\nHuman:" in chosen:
        return _parse_hh(chosen, rejected, where)
    if "prompt" not in rec:
        raise DataError(*where, "prompt", f"missing (the record has keys {sorted(rec)})")
    return _prompt(rec["prompt"], where, "prompt"), chosen, rejected


def _parse_message_pair(rec: dict, where: _Where) -> tuple[list[Message], str, str]:
    chosen = _messages(rec["chosen"], where, "chosen", empty_last_ok=True)
    rejected = _messages(rec["rejected"], where, "rejected", empty_last_ok=True)
    for key, msgs in (("chosen", chosen), ("rejected", rejected)):
        if msgs[-1]["role"] != "assistant":
            problem = "the last message must be the assistant response"
            raise DataError(*where, f"{key}[{len(msgs) - 1}].role", problem)
    k = 0
    while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
        k += 1
    if k != len(chosen) - 1 or k != len(rejected) - 1:
        problem = "chosen and rejected must share every message except the last (the response)"
        raise DataError(*where, "rejected", problem)
    prompt = (_prompt(rec["prompt"], where, "prompt") if "prompt" in rec else []) + chosen[:k]
    _check_ends_with_user(prompt, where, "chosen")
    return prompt, chosen[-1]["content"], rejected[-1]["content"]


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ASSISTANT = "\n\nAssistant:"


def _parse_hh(chosen: str, rejected: str, where: _Where) -> tuple[list[Message], str, str]:
    common = len(os.path.commonprefix([chosen, rejected]))
    cut = chosen.rfind(_HH_ASSISTANT, 0, common)
    if cut < 0:
        problem = "hh-rlhf transcript: chosen and rejected share no '\\n\\nAssistant:' turn"
        raise DataError(*where, "chosen", problem)
    parts = _HH_TURN.split(chosen[:cut])  # [text before the first turn, role, content, role, content, ...]
    if parts[0].strip():
        raise DataError(*where, "chosen", "hh-rlhf transcript must start with '\\n\\nHuman:'")
    prompt = [
        {"role": "user" if role == "Human" else "assistant", "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2], strict=True)
    ]
    _check_ends_with_user(prompt, where, "chosen")
    start = cut + len(_HH_ASSISTANT)
    return prompt, chosen[start:].strip(), rejected[start:].strip()


def load_prompts(
    path: str | os.PathLike, prompt_field: str = "prompt", answer_field: str = "answer", numeric_answers: bool = False
) -> list[PromptExample]:
    """Records `{prompt_field: str | messages, answer_field?: str | number}` -> prompts for RL / eval.
    Numeric answers become strings; GSM8K-style answers ("... #### 18") are kept raw. With `numeric_answers`
    (an answer-checking reward), every record needs an answer the checker can read as a number."""
    out = []
    for file, line, rec in read_jsonl(path):
        where = (file, line)
        if prompt_field not in rec:
            raise DataError(*where, prompt_field, f"missing (the record has keys {sorted(rec)})")
        prompt = _prompt(rec[prompt_field], where, prompt_field)
        answer = rec.get(answer_field)
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float, type(None))):
            raise DataError(*where, answer_field, f"expected a string or a number, got {_type_name(answer)}")
        if isinstance(answer, float) and answer.is_integer():
            answer = int(answer)
        if isinstance(answer, (int, float)):
            answer = str(answer)
        if answer is not None and not answer.strip():
            raise DataError(*where, answer_field, "empty string")
        if numeric_answers and (answer is None or reference_number(answer) is None):
            shown = "missing" if answer is None else f"{answer[:40]!r}{'...' if len(answer) > 40 else ''}"
            raise DataError(*where, answer_field, f"{shown} is not a number the answer reward can check (e.g. 42, "
                                                  f"3.5 or '... #### 42', at most {MAX_ANSWER_CHARS} characters)")
        out.append(PromptExample(prompt, answer))
    return out
