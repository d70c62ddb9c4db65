"""The BPE tokenizer and ChatML template: round trips, single-digit tokens, save/load, the assistant mask,
prompt-prefix property, and agreement with `transformers.AutoTokenizer` + its chat template."""

from __future__ import annotations

import pytest

from minirlhf.tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, Tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are a careful tutor."},
    {"role": "user", "content": "Tom has 12 apples. He buys 7 more. How many apples does Tom have now?"},
    {"role": "assistant", "content": "12 + 7 = 19. The answer is 19."},
    {"role": "user", "content": "And if he loses 4?"},
    {"role": "assistant", "content": "19 - 4 = 15. The answer is 15."},
]


def template(messages, add_generation_prompt=False) -> str:
    text = "".join(f"{BOS_TOKEN}{m['role']}\n{m['content']}{EOS_TOKEN}\n" for m in messages)
    return text + (f"{BOS_TOKEN}assistant\n" if add_generation_prompt else "")


def test_special_token_ids(tokenizer):
    assert [tokenizer.backend.token_to_id(t) for t in (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)] == [0, 1, 2]
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.vocab_size) == (0, 2, 320)


@pytest.mark.parametrize("text", [
    "Tom has 12 apples. He gives 5 to Sara; now 12 - 5 = 7!",
    "3 * 4 = 12. 1,234.50 (approx.) -> #### 42?",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "unicode: café, naïve, 数字 42 — ok",
])
def test_encode_decode_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_digits_are_single_tokens(tokenizer):
    for number in ["7", "42", "1234567890", "2024"]:
        pieces = [tokenizer.decode([i]) for i in tokenizer.encode(number)]
        assert pieces == list(number)
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("He has 305 coins.")]
    assert "3" in pieces and "0" in pieces and "5" in pieces
    assert not any(any(c.isdigit() for c in p) and len(p.strip()) > 1 for p in pieces)


def test_special_tokens_are_single_ids_and_skipped_on_decode(tokenizer):
    ids = tokenizer.encode(f"{BOS_TOKEN}user\nhi{EOS_TOKEN}")
    assert ids[0] == 1 and ids[-1] == tokenizer.eos_id
    assert tokenizer.decode(ids) == "user\nhi"
    assert tokenizer.decode(ids, skip_special_tokens=False) == f"{BOS_TOKEN}user\nhi{EOS_TOKEN}"


def test_save_load_round_trip(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    loaded = Tokenizer.load(tmp_path)
    assert (loaded.vocab_size, loaded.eos_id, loaded.pad_id) == (tokenizer.vocab_size, tokenizer.eos_id,
                                                                 tokenizer.pad_id)
    text = "Sara has 3 more cards than Ben. 9 + 3 = 12."
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.encode_chat(CONVERSATION) == tokenizer.encode_chat(CONVERSATION)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path / "missing")


def test_encode_chat_renders_the_template(tokenizer):
    ids, mask = tokenizer.encode_chat(CONVERSATION)
    assert len(ids) == len(mask)
    assert tokenizer.decode(ids, skip_special_tokens=False) == template(CONVERSATION)


def test_assistant_mask_covers_exactly_assistant_content_and_its_end_token(tokenizer):
    ids, mask = tokenizer.encode_chat(CONVERSATION)
    assert set(mask) == {0, 1}
    # Split the 1s into contiguous spans: one per assistant turn.
    spans, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    assistant = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert len(spans) == len(assistant)
    for (lo, hi), content in zip(spans, assistant):
        assert tokenizer.decode(ids[lo:hi], skip_special_tokens=False) == content + EOS_TOKEN
        assert ids[hi - 1] == tokenizer.eos_id
        # The header just before the span is masked out, and so is the newline after it.
        assert tokenizer.decode(ids[:lo], skip_special_tokens=False).endswith(f"{BOS_TOKEN}assistant\n")
        assert tokenizer.decode([ids[hi]], skip_special_tokens=False) == "\n" and mask[hi] == 0
    # Everything outside the spans (system, user turns, headers, separators) has mask 0.
    outside = "".join(tokenizer.decode([i], skip_special_tokens=False) for i, m in zip(ids, mask) if not m)
    for m in CONVERSATION:
        if m["role"] != "assistant":
            assert m["content"] in outside
    # Every end-of-turn token of a non-assistant turn is masked out.
    eos_positions = [i for i, t in enumerate(ids) if t == tokenizer.eos_id]
    assert [mask[i] for i in eos_positions] == [0, 0, 1, 0, 1]


def test_a_conversation_without_assistant_turns_has_an_all_zero_mask(tokenizer):
    _, mask = tokenizer.encode_chat(CONVERSATION[:2])
    assert set(mask) == {0}


def test_prompt_ids_are_a_prefix_of_prompt_plus_response(tokenizer):
    for cut in (2, 4):  # after the first and the second user turn
        prompt = tokenizer.encode_prompt(CONVERSATION[:cut])
        full, mask = tokenizer.encode_chat(CONVERSATION[:cut + 1])
        assert full[:len(prompt)] == prompt
        # The prompt part of the mask is the prompt's own mask: earlier assistant turns only, never the header.
        assert mask[:len(prompt)] == tokenizer.encode_chat(CONVERSATION[:cut], add_generation_prompt=True)[1]
        earlier = len(tokenizer.encode_response(CONVERSATION[2]["content"])) if cut == 4 else 0
        assert sum(mask[:len(prompt)]) == earlier
        response = tokenizer.encode_response(CONVERSATION[cut]["content"])
        assert full[len(prompt):len(prompt) + len(response)] == response
        assert response[-1] == tokenizer.eos_id
    prompt = tokenizer.encode_prompt(CONVERSATION[:2])
    assert tokenizer.decode(prompt, skip_special_tokens=False) == template(CONVERSATION[:2], True)


def test_transformers_loads_the_saved_tokenizer_and_chat_template(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    tokenizer.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.eos_token == EOS_TOKEN and hf.pad_token == PAD_TOKEN
    assert hf.eos_token_id == tokenizer.eos_id and hf.pad_token_id == tokenizer.pad_id
    text = "Mia has 14 shells. She loses 6. 14 - 6 = 8."
    assert hf(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
    for cut in (2, 4):
        messages = CONVERSATION[:cut]
        rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ours = tokenizer.encode_prompt(messages)
        assert rendered == tokenizer.decode(ours, skip_special_tokens=False)
        # And tokenizing the rendered string in one go gives the same ids as our turn-by-turn encoding.
        assert hf(rendered, add_special_tokens=False)["input_ids"] == ours
    rendered_full = hf.apply_chat_template(CONVERSATION, tokenize=False)
    assert rendered_full == template(CONVERSATION)
