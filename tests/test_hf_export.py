"""Export to Hugging Face Llama format: `transformers.AutoModelForCausalLM` loads it and gives the same
logits, with and without padding; the `export-hf` CLI does the same from a saved model dir."""

from __future__ import annotations

import json

import pytest
import torch

from minirlhf.cli import main
from minirlhf.model.hf_export import export_hf

transformers = pytest.importorskip("transformers")

ATOL = 1e-5


def load_hf(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


def assert_same_logits(hf_model, model, vocab: int) -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, :2] = 0
    ids[mask == 0] = 0
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, model(ids).logits, atol=ATOL, rtol=0)
        ours = model(ids, attention_mask=mask).logits
        # Hugging Face's generate derives position ids from the mask the same way; pass them explicitly.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        theirs = hf_model(ids, attention_mask=mask, position_ids=positions).logits
        real = mask.bool()
        torch.testing.assert_close(theirs[real], ours[real], atol=ATOL, rtol=0)
        # Each padded row agrees with the same row unpadded.
        torch.testing.assert_close(theirs[1, 4:], hf_model(ids[1:2, 4:]).logits[0], atol=ATOL, rtol=0)


def test_export_loads_in_transformers_with_identical_logits(make_model, tokenizer, tmp_path):
    model = make_model(seed=1, vocab_size=tokenizer.vocab_size)
    tokenizer.save(tmp_path / "tok")
    out = export_hf(model, tmp_path / "hf", tokenizer_dir=tmp_path / "tok", eos_id=tokenizer.eos_id,
                    pad_id=tokenizer.pad_id)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    hf_model = load_hf(out)
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in hf_model.parameters()) == model.num_parameters()
    assert_same_logits(hf_model, model, tokenizer.vocab_size)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tok.eos_token_id == tokenizer.eos_id == hf_model.config.eos_token_id


def test_export_hf_cli_from_a_saved_model_dir(make_model, tokenizer, tmp_path, capsys):
    model = make_model(seed=2, vocab_size=tokenizer.vocab_size, tie_embeddings=False)
    model.save_pretrained(tmp_path / "native")
    tokenizer.save(tmp_path / "native")
    assert main(["export-hf", "--model", str(tmp_path / "native"), "--out", str(tmp_path / "hf")]) == 0
    assert "wrote Hugging Face Llama model" in capsys.readouterr().out
    hf_model = load_hf(tmp_path / "hf")
    assert hf_model.config.tie_word_embeddings is False
    assert_same_logits(hf_model, model, tokenizer.vocab_size)


def test_export_refuses_moe_and_cli_reports_missing_model(make_model, tmp_path, capsys):
    with pytest.raises(ValueError, match="mixture-of-experts"):
        export_hf(make_model(use_moe=True), tmp_path / "hf")
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    assert main(["export-hf", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minirlhf: error: ") and "nope" in err[0]
