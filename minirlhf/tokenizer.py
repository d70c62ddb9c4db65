"""Byte-level BPE tokenizer and the ChatML chat template.

Trained with the `tokenizers` library (digits split one per token, which makes arithmetic learnable for
tiny models) and saved as `tokenizer.json` + `tokenizer_config.json`, so `transformers.AutoTokenizer`
loads it too. An existing Hugging Face `tokenizer.json` loads the same way.

Chat template (ChatML, as MiniMind and Qwen use):
    <|im_start|>{role}\n{content}<|im_end|>\n ...  then `<|im_start|>assistant\n` to generate.
A conversation is encoded turn by turn, so the ids of a prompt are always a prefix of the ids of the
prompt plus its response; the assistant mask is 1 on assistant content and on the `<|im_end|>` that ends
it (the model must learn to stop), never on headers, other roles or padding.

A Hugging Face model's tokenizer with its own chat template loads as `ChatTemplateTokenizer`: the template
is rendered by `transformers`, turn by turn, with the same masking rule; its end-of-turn token is read off
the template (e.g. `<|im_end|>`, `<|eot_id|>`) and ends generation.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

Message = dict[str, str]


class Tokenizer:
    """Thin wrapper over `tokenizers.Tokenizer` that knows the chat template and special ids."""

    def __init__(self, tokenizer: HFTokenizer, eos_token: str = EOS_TOKEN, pad_token: str = PAD_TOKEN) -> None:
        self.backend = tokenizer
        self.eos_token, self.pad_token = eos_token, pad_token
        eos_id, pad_id = tokenizer.token_to_id(eos_token), tokenizer.token_to_id(pad_token)
        if eos_id is None:
            raise ValueError(f"tokenizer has no end-of-turn token {eos_token!r}")
        self.eos_id = eos_id
        self.pad_id = pad_id if pad_id is not None else eos_id

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """An upper bound on the UTF-8 bytes one token stands for (4 per character of its longest vocabulary
        entry), so a text of n bytes needs at least n / max_token_bytes tokens."""
        return 4 * max((len(t) for t in self.backend.get_vocab()), default=1)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows: Iterable[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return self.backend.decode_batch([list(r) for r in rows], skip_special_tokens=skip_special_tokens)

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = False
                    ) -> tuple[list[int], list[int]]:
        """(ids, assistant_mask) of a conversation rendered with the chat template."""
        ids: list[int] = []
        mask: list[int] = []
        for m in messages:
            header = self.encode(f"{BOS_TOKEN}{m['role']}\n")
            body = self.encode(m["content"]) + [self.eos_id]
            tail = self.encode("\n")
            learn = int(m["role"] == "assistant")
            ids += header + body + tail
            mask += [0] * len(header) + [learn] * len(body) + [0] * len(tail)
        if add_generation_prompt:
            header = self.encode(f"{BOS_TOKEN}assistant\n")
            ids += header
            mask += [0] * len(header)
        return ids, mask

    def encode_prompt(self, messages: Sequence[Message]) -> list[int]:
        """Ids of the conversation so far, ending with the assistant header."""
        return self.encode_chat(messages, add_generation_prompt=True)[0]

    def encode_response(self, text: str) -> list[int]:
        """Ids of an assistant response as it follows `encode_prompt`: content then end-of-turn."""
        return self.encode(text) + [self.eos_id]

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "bos_token": None,
            "unk_token": None,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (ours or a Hugging Face model's) and its special tokens; a tokenizer with a
        chat template of its own loads as a `ChatTemplateTokenizer`."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: no tokenizer.json (train one with `minirlhf tokenizer`)")
        eos, pad = EOS_TOKEN, PAD_TOKEN
        config_path = directory / "tokenizer_config.json"
        try:
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{config_path}: not valid JSON ({str(e).splitlines()[0][:200]})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{config_path}: expected a JSON object")
        template = config.get("chat_template")
        if (directory / "chat_template.jinja").is_file() or (template and template != CHAT_TEMPLATE):
            return ChatTemplateTokenizer.load(directory)
        eos = _token_text(config.get("eos_token")) or eos
        pad = _token_text(config.get("pad_token")) or pad
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception for damaged files
            raise ValueError(f"{path}: not a readable tokenizer ({str(e).splitlines()[0][:200]})") from None
        return cls(backend, eos_token=eos, pad_token=pad)


class ChatTemplateTokenizer(Tokenizer):
    """A `transformers` fast tokenizer whose own chat template (Jinja) renders conversations.

    Turn by turn, the text before each assistant turn (ending with the template's generation header) is
    masked 0; the assistant content plus its end-of-turn token is masked 1. Templates that do not put
    the end-of-turn token right after the content get the whole rendered turn masked 1.
    """

    def __init__(self, hf_tokenizer) -> None:
        self.hf = hf_tokenizer
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        prefix, full = self._render(probe[:1], True), self._render(probe, False)
        turn_end = None
        if full.startswith(prefix + "y"):
            after = hf_tokenizer(full[len(prefix) + 1:], add_special_tokens=False).input_ids
            special = set(hf_tokenizer.all_special_ids) | {
                i for i, t in hf_tokenizer.added_tokens_decoder.items() if t.special}
            turn_end = after[0] if after and after[0] in special else None
        eos_token = hf_tokenizer.convert_ids_to_tokens(turn_end) if turn_end is not None else hf_tokenizer.eos_token
        if eos_token is None:
            raise ValueError("tokenizer has neither an end-of-turn token in its chat template nor an eos_token")
        super().__init__(hf_tokenizer.backend_tokenizer, eos_token=eos_token,
                         pad_token=hf_tokenizer.pad_token or eos_token)

    def _render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        return self.hf.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = False
                    ) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        mask: list[int] = []
        done = ""  # the rendered text already tokenized

        def extend(text: str, learn: int) -> None:
            piece = self.encode(text)
            ids.extend(piece)
            mask.extend([learn] * len(piece))

        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix, full = self._render(messages[:i], True), self._render(messages[:i + 1], False)
            if not prefix.startswith(done) or not full.startswith(prefix):
                raise ValueError("the chat template does not render conversations as prefixes of each other")
            extend(prefix[len(done):], 0)
            body = m["content"] + self.eos_token
            if full[len(prefix):].startswith(body):
                ids.extend(self.encode_response(m["content"]))
                mask.extend([1] * (len(ids) - len(mask)))
                done = prefix + body
            else:
                extend(full[len(prefix):], 1)
                done = full
        rest = self._render(messages, add_generation_prompt) if messages else ""
        if not rest.startswith(done):
            raise ValueError("the chat template does not render conversations as prefixes of each other")
        extend(rest[len(done):], 0)
        return ids, mask

    def save(self, directory: str | Path) -> None:
        self.hf.save_pretrained(str(directory))

    @classmethod
    def load(cls, directory: str | Path) -> ChatTemplateTokenizer:
        from transformers import AutoTokenizer

        hf_tokenizer = AutoTokenizer.from_pretrained(str(directory))
        if not hf_tokenizer.is_fast:
            raise ValueError(f"{directory}: needs a fast tokenizer (tokenizer.json)")
        return cls(hf_tokenizer)


def _token_text(token: str | dict | None) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on `texts`; ids 0, 1, 2 are <|endoftext|>, <|im_start|>, <|im_end|>."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend)
