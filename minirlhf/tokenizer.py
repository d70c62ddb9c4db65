"""Byte-level BPE tokenizer and the ChatML chat template.

Trained with the `tokenizers` library (digits split one per token, which makes arithmetic learnable for
tiny models) and saved as `tokenizer.json` + `tokenizer_config.json`, so `transformers.AutoTokenizer`
loads it too. An existing Hugging Face `tokenizer.json` loads the same way.

Chat template (ChatML, as MiniMind and Qwen use):
    <|im_start|>{role}\n{content}<|im_end|>\n ...  then `<|im_start|>assistant\n` to generate.
A conversation is encoded turn by turn, so the ids of a prompt are always a prefix of the ids of the
prompt plus its response; the assistant mask is 1 on assistant content and on the `<|im_end|>` that ends
it (the model must learn to stop), never on headers, other roles or padding.
"""

from __future__ import annotations

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
        """Load `tokenizer.json` (ours or a Hugging Face model's) and its special tokens."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: no tokenizer.json (train one with `minirlhf tokenizer`)")
        eos, pad = EOS_TOKEN, PAD_TOKEN
        config_path = directory / "tokenizer_config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text())
            eos = _token_text(config.get("eos_token")) or eos
            pad = _token_text(config.get("pad_token")) or pad
        return cls(HFTokenizer.from_file(str(path)), eos_token=eos, pad_token=pad)


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
