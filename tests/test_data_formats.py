"""JSONL loaders: every error kind names file, line and field; the preference shapes; real public data."""

import gzip
import json
import pickle
from pathlib import Path

import pytest

from minirlhf.data import (
    DataError,
    PreferencePair,
    PromptExample,
    load_preferences,
    load_pretrain,
    load_prompts,
    load_sft,
    read_jsonl,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write(path: Path, *lines: object) -> Path:
    """Write lines to a file: dicts/lists as JSON, str as-is, bytes raw."""
    data = b"".join(
        (line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode())
        + b"\n"
        for line in lines
    )
    path.write_bytes(data)
    return path


def sft_rec(*messages: tuple[str, str]) -> dict:
    return {"conversations": [{"role": r, "content": c} for r, c in messages]}


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def asst(content: str) -> dict:
    return {"role": "assistant", "content": content}


GOOD_SFT = sft_rec(("user", "hi"), ("assistant", "hello"))


def assert_error(loader, path: Path, line: int | None, field: str | None, fragment: str) -> DataError:
    with pytest.raises(DataError) as info:
        loader(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert path.name in msg
    if line is not None:
        assert f"{path.name}:{line}:" in msg
    if field is not None:
        assert f"field '{field}'" in msg
    assert fragment in msg, msg
    return info.value


# ----------------------------------------------------------------------------------------------------
# Errors


def test_error_message_format():
    e = DataError("data/sft.jsonl", 12, "conversations[1].role", "unknown role 'bot'")
    assert str(e) == "data/sft.jsonl:12: field 'conversations[1].role': unknown role 'bot'"
    assert str(DataError("x.jsonl", None, None, "file not found")) == "x.jsonl: file not found"
    assert str(pickle.loads(pickle.dumps(e))) == str(e)


def test_invalid_json(tmp_path):
    path = write(tmp_path / "a.jsonl", GOOD_SFT, "{'role': 1}")
    assert_error(load_sft, path, 2, None, "invalid JSON")


def test_not_an_object(tmp_path):
    path = write(tmp_path / "a.jsonl", GOOD_SFT, "", [1, 2])
    assert_error(load_sft, path, 3, None, "expected a JSON object, got a list")


def test_missing_field(tmp_path):
    path = write(tmp_path / "a.jsonl", {"text": "ok"}, {"txt": "typo"})
    assert_error(load_pretrain, path, 2, "text", "missing")
    path = write(tmp_path / "b.jsonl", {"chat": []})
    assert_error(load_sft, path, 1, "conversations", "missing")
    path = write(tmp_path / "c.jsonl", {"prompt": "q", "chosen": "a"})
    assert_error(load_preferences, path, 1, "rejected", "missing")
    path = write(tmp_path / "d.jsonl", {"chosen": "a", "rejected": "b"})
    assert_error(load_preferences, path, 1, "prompt", "missing")
    path = write(tmp_path / "e.jsonl", {"question": "q"})
    assert_error(load_prompts, path, 1, "prompt", "missing")
    path = write(tmp_path / "f.jsonl", {"conversations": [{"role": "user"}]})
    assert_error(load_sft, path, 1, "conversations[0].content", "missing")


def test_wrong_type(tmp_path):
    path = write(tmp_path / "a.jsonl", {"text": 3})
    assert_error(load_pretrain, path, 1, "text", "expected a string, got a number")
    path = write(tmp_path / "b.jsonl", {"messages": "hello"})
    assert_error(load_sft, path, 1, "messages", "expected a list of messages")
    path = write(tmp_path / "c.jsonl", {"prompt": "q", "chosen": 1, "rejected": "b"})
    assert_error(load_preferences, path, 1, "chosen", "expected a string or a list of messages")
    path = write(tmp_path / "d.jsonl", {"prompt": "q", "answer": [1]})
    assert_error(load_prompts, path, 1, "answer", "expected a string or a number")
    path = write(tmp_path / "e.jsonl", {"conversations": [{"role": "user", "content": 5}]})
    assert_error(load_sft, path, 1, "conversations[0].content", "expected a string")


def test_empty_string(tmp_path):
    path = write(tmp_path / "a.jsonl", {"text": "ok"}, {"text": "ok"}, {"text": "  "})
    assert_error(load_pretrain, path, 3, "text", "empty string")
    path = write(tmp_path / "b.jsonl", {"prompt": ""})
    assert_error(load_prompts, path, 1, "prompt", "empty string")


def test_unknown_role(tmp_path):
    path = write(tmp_path / "sft.jsonl", GOOD_SFT, sft_rec(("user", "hi"), ("bot", "hello")))
    e = assert_error(load_sft, path, 2, "conversations[1].role", "unknown role 'bot'")
    assert "(expected system, user, assistant)" in str(e)
    assert (e.line, e.field) == (2, "conversations[1].role")


def test_no_assistant_turn(tmp_path):
    path = write(tmp_path / "a.jsonl", sft_rec(("system", "be nice"), ("user", "hi")))
    assert_error(load_sft, path, 1, "conversations", "no assistant turn")


def test_non_utf8(tmp_path):
    path = write(tmp_path / "a.jsonl", {"text": "ok"}, b'{"text": "caf\xe9"}')
    assert_error(load_pretrain, path, 2, None, "not valid UTF-8")


def test_empty_file(tmp_path):
    path = write(tmp_path / "a.jsonl", "", "   ")
    assert_error(load_pretrain, path, None, None, "no records")


def test_missing_file_and_empty_directory(tmp_path):
    assert_error(load_sft, tmp_path / "nope.jsonl", None, None, "file not found")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="directory contains no .jsonl"):
        load_sft(tmp_path)


def test_directory_and_gzip(tmp_path):
    write(tmp_path / "b.jsonl", {"text": "second"})
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "first"}) + "\n")
    (tmp_path / "ignored.txt").write_text("x")
    assert load_pretrain(tmp_path) == ["first", "second"]
    # errors inside a directory name the file, not the directory
    write(tmp_path / "c.jsonl", {"text": 1})
    assert_error(load_pretrain, tmp_path / "c.jsonl", 1, "text", "expected a string")
    with pytest.raises(DataError, match=r"c\.jsonl:1: field 'text'"):
        load_pretrain(tmp_path)
    assert [line for _, line, _ in read_jsonl(tmp_path / "b.jsonl")] == [1]


# ----------------------------------------------------------------------------------------------------
# Loaders


def test_load_sft_both_keys(tmp_path):
    path = write(tmp_path / "a.jsonl", GOOD_SFT, {"messages": [user("q") | {"name": "x"}, asst("a")]})
    assert load_sft(path) == [[user("hi"), asst("hello")], [user("q"), asst("a")]]


def test_load_prompts(tmp_path):
    path = write(tmp_path / "a.jsonl", {"prompt": "2+2?", "answer": 4}, {"prompt": "half?", "answer": 0.5},
                 {"prompt": "x", "answer": 12.0}, {"prompt": [{"role": "user", "content": "hi"}]})
    out = load_prompts(path)
    assert [e.answer for e in out] == ["4", "0.5", "12", None]
    assert out[0] == PromptExample([{"role": "user", "content": "2+2?"}], "4")
    path = write(tmp_path / "b.jsonl", {"prompt": [{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "yo"}]})
    assert_error(load_prompts, path, 1, "prompt", "must end with a user turn")


def test_preferences_string_shape(tmp_path):
    path = write(tmp_path / "p.jsonl", {"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert load_preferences(path) == [PreferencePair([{"role": "user", "content": "q"}], "good", "bad")]


def test_preferences_message_list_shape(tmp_path):
    minimind = {"chosen": [user("q"), asst("good")], "rejected": [user("q"), asst("bad")]}
    system = {"role": "system", "content": "s"}
    trl = {"prompt": [system, user("q")], "chosen": [asst("good")], "rejected": [asst("bad")]}
    multi_turn = {"chosen": [user("q"), asst("a"), user("r"), asst("good")],
                  "rejected": [user("q"), asst("a"), user("r"), asst("bad")]}
    pairs = load_preferences(write(tmp_path / "p.jsonl", minimind, trl, multi_turn))
    assert pairs[0] == PreferencePair([user("q")], "good", "bad")
    assert pairs[1] == PreferencePair([system, user("q")], "good", "bad")
    assert pairs[2] == PreferencePair([user("q"), asst("a"), user("r")], "good", "bad")
    diverged = {"chosen": [user("q"), asst("a"), user("r"), asst("b")],
                "rejected": [user("q"), asst("x"), user("r"), asst("y")]}
    path = write(tmp_path / "d.jsonl", diverged)
    assert_error(load_preferences, path, 1, "rejected", "share every message")
    path = write(tmp_path / "n.jsonl", {"chosen": [user("q")], "rejected": [user("q")]})
    assert_error(load_preferences, path, 1, "chosen[0].role", "assistant")


def test_preferences_hh_transcript_two_human_turns(tmp_path):
    common = "\n\nHuman: What is 2+2?\n\nAssistant: It is 4.\n\nHuman:  And 3+3? \n\nAssistant:"
    rec = {"chosen": common + " It is 6.", "rejected": common + " It is 7."}
    [pair] = load_preferences(write(tmp_path / "hh.jsonl", rec))
    assert pair.prompt == [user("What is 2+2?"), asst("It is 4."), user("And 3+3?")]
    assert (pair.chosen, pair.rejected) == ("It is 6.", "It is 7.")
    # responses that share a prefix: the split is still at the last common "\n\nAssistant:"
    rec = {"chosen": common + " It is 6, sure.", "rejected": common + " It is 6? No."}
    [pair] = load_preferences(write(tmp_path / "hh2.jsonl", rec))
    assert (pair.chosen, pair.rejected, len(pair.prompt)) == ("It is 6, sure.", "It is 6? No.", 3)


def test_preferences_skips_are_reported(tmp_path):
    path = write(tmp_path / "pref.jsonl",
                 {"prompt": "q", "chosen": "same", "rejected": "same"},
                 {"prompt": "q", "chosen": "good", "rejected": "bad"},
                 {"prompt": "q", "chosen": "", "rejected": "bad"},
                 {"chosen": [user("q"), asst("ok")], "rejected": [user("q"), asst(" ")]},
                 {"chosen": "\n\nHuman: hi\n\nAssistant: ", "rejected": "\n\nHuman: hi\n\nAssistant: hello"})
    skipped: list[str] = []
    pairs = load_preferences(path, skipped=skipped)
    assert len(pairs) == 1
    assert skipped == [f"{path}:1: skipped: chosen equals rejected",
                       f"{path}:3: skipped: empty chosen response",
                       f"{path}:4: skipped: empty rejected response",
                       f"{path}:5: skipped: empty chosen response"]
    path = write(tmp_path / "all.jsonl", {"prompt": "q", "chosen": "same", "rejected": "same"})
    assert_error(load_preferences, path, None, None, "all 1 pairs were skipped")


# ----------------------------------------------------------------------------------------------------
# Real public data (skipped when ../shared/data is absent)


def test_real_hh_rlhf():
    path = SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    if not path.exists():
        pytest.skip(f"{path} not present")
    n_lines = sum(1 for _ in read_jsonl(path))
    skipped: list[str] = []
    pairs = load_preferences(path, skipped=skipped)
    assert len(pairs) + len(skipped) == n_lines
    assert len(pairs) >= 0.95 * n_lines
    for pair in pairs:
        assert pair.prompt[0]["role"] == "user" and pair.prompt[-1]["role"] == "user"
        assert pair.chosen and pair.rejected and pair.chosen != pair.rejected
        assert all(m["content"] == m["content"].strip() for m in pair.prompt)


def test_real_gsm8k():
    path = SHARED_DATA / "gsm8k" / "test.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not present")
    examples = load_prompts(path, prompt_field="question")
    assert len(examples) > 1000
    assert all(e.answer is not None and "####" in e.answer for e in examples)
    assert all(len(e.prompt) == 1 and e.prompt[0]["role"] == "user" for e in examples)


def test_a_saved_datasets_dataset_is_data_too(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"question": "What is 2 + 3?", "answer": "#### 5"}, {"question": "What is 4 * 4?", "answer": "#### 16"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    prompts = load_prompts(tmp_path / "single", prompt_field="question")
    assert [p.prompt[0]["content"] for p in prompts] == ["What is 2 + 3?", "What is 4 * 4?"]
    assert [p.answer for p in prompts] == ["#### 5", "#### 16"]

    chats = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(chats),
                                   "test": datasets.Dataset.from_list(chats * 2)})
    splits.save_to_disk(str(tmp_path / "dict"))
    assert len(load_sft(tmp_path / "dict")) == 1  # the train split by default
    assert len(load_sft(f"{tmp_path / 'dict'}:test")) == 2
    with pytest.raises(DataError, match=r"name a split as .*:<split>; it has \['test', 'train'\]"):
        load_sft(f"{tmp_path / 'dict'}:validation")
    datasets.Dataset.from_list([{"messages": [{"role": "robot", "content": "x"}]}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad:1: field 'messages\[0\].role'"):
        load_sft(tmp_path / "bad")
