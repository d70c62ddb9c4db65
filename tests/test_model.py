"""The native decoder: KV cache == full forward, padding invariance on both sides, MoE aux loss, save/load,
corrupted weights, preset sizes."""

from __future__ import annotations

import pytest
import torch

from minirlhf.model import MiniMindLM, ModelConfig, preset
from minirlhf.model.linear import has_onednn_linear
from minirlhf.model.minimind import MoEFeedForward

ATOL = 1e-5


def left_padded_batch(lengths: list[int], vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (batch, max(lengths)) right-aligned, with a matching 0/1 mask; pads are id 0."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids, mask


@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("explicit_positions", [False, True], ids=["mask_positions", "explicit_positions"])
def test_kv_cache_matches_full_forward(make_model, use_moe, explicit_positions):
    model = make_model(seed=1, use_moe=use_moe)
    prompt_len, new = 7, 6
    # Prompts of 7, 4 and 2 real tokens, left-padded; then 6 continuation tokens for every row.
    prompt_ids, prompt_mask = left_padded_batch([7, 4, 2], vocab=64, seed=2)
    cont = torch.randint(3, 64, (3, new), generator=torch.Generator().manual_seed(3))
    ids = torch.cat([prompt_ids, cont], 1)
    mask = torch.cat([prompt_mask, torch.ones_like(cont)], 1)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = model.new_cache(3, prompt_len + new)
        prefill = model(prompt_ids, attention_mask=prompt_mask, cache=cache).logits
        assert cache.length == prompt_len
        real = prompt_mask.bool()
        torch.testing.assert_close(prefill[real], full[:, :prompt_len][real], atol=ATOL, rtol=0)
        steps = [(0, 2)] + [(t, t + 1) for t in range(2, new)]  # one two-token chunk, then single tokens
        for lo, hi in steps:
            kwargs = {}
            if explicit_positions:
                kwargs["position_ids"] = (mask.cumsum(-1) - 1)[:, prompt_len + lo:prompt_len + hi]
            out = model(cont[:, lo:hi], attention_mask=mask[:, :prompt_len + hi], cache=cache, **kwargs).logits
            assert out.shape == (3, hi - lo, 64)
            torch.testing.assert_close(out, full[:, prompt_len + lo:prompt_len + hi], atol=ATOL, rtol=0)
        assert cache.length == prompt_len + new


def test_input_longer_than_max_seq_len_raises(make_model):
    model = make_model(max_seq_len=16)
    with pytest.raises(ValueError, match="exceeds max_seq_len 16"):
        model(torch.ones(1, 17, dtype=torch.long))


@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
def test_padding_on_either_side_leaves_real_logits_unchanged(make_model, use_moe):
    model = make_model(seed=4, use_moe=use_moe)
    row = torch.randint(3, 64, (6,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        alone = model(row[None]).logits[0]
        # The pad ids are arbitrary tokens: masking, not the id, must hide them.
        pads = torch.tensor([7, 9, 11])
        left = torch.cat([pads, row])[None]
        left_mask = torch.tensor([[0, 0, 0] + [1] * 6])
        right = torch.cat([row, pads])[None]
        right_mask = torch.tensor([[1] * 6 + [0, 0, 0]])
        # Put the padded row in a batch next to an unpadded one, as collators do.
        other = torch.randint(3, 64, (9,), generator=torch.Generator().manual_seed(6))
        batch = torch.stack([left[0], right[0], other])
        batch_mask = torch.cat([left_mask, right_mask, torch.ones(1, 9, dtype=torch.long)])
        out = model(batch, attention_mask=batch_mask).logits
    assert torch.isfinite(out).all()  # fully padded query rows must not produce NaNs
    torch.testing.assert_close(out[0, 3:], alone, atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1, :6], alone, atol=ATOL, rtol=0)
    torch.testing.assert_close(out[2], model(other[None]).logits[0].detach(), atol=ATOL, rtol=0)
    # Sanity: without the mask the left-padded row does see the pads, so the test can fail.
    assert (model(left).logits[0, 3:] - alone).abs().max() > 1e-3


def test_default_positions_follow_the_attention_mask(make_model):
    model = make_model(seed=7)
    ids = torch.tensor([[0, 0, 5, 6, 7], [5, 6, 7, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    explicit = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]])
    with torch.no_grad():
        a = model(ids, attention_mask=mask).logits
        b = model(ids, attention_mask=mask, position_ids=explicit).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_moe_aux_loss_is_returned_positive_and_matches_switch_formula(make_model):
    model = make_model(seed=8, use_moe=True, num_experts=4, experts_per_token=2, aux_loss_coef=0.01)
    dense = make_model(seed=8)
    ids, mask = left_padded_batch([8, 5], vocab=64, seed=9)
    out = model(ids, attention_mask=mask)
    assert dense(ids, attention_mask=mask).aux_loss is None
    aux = out.aux_loss
    assert aux is not None and aux.dim() == 0 and torch.isfinite(aux)
    # E * sum_e f_e P_e lies in (0, E], so the weighted mean over layers lies in (0, E * coef].
    assert 0 < aux.item() <= 4 * 0.01
    aux.backward()
    assert model.layers[0].mlp.router.weight.grad.abs().sum() > 0  # the balancing loss trains the router

    # Hand computation of one layer's Switch loss.
    torch.manual_seed(10)
    moe = MoEFeedForward(ModelConfig(vocab_size=64, hidden_size=16, num_heads=2, num_kv_heads=1,
                                     intermediate_size=32, use_moe=True, num_experts=3, experts_per_token=1))
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        _, layer_aux = moe(x)
        probs = torch.softmax(moe.router(x.reshape(-1, 16)), -1)
    counts = [0.0] * 3
    for p in probs:
        counts[int(p.argmax())] += 1
    expected = 3 * sum(counts[e] / 10 * float(probs[:, e].mean()) for e in range(3))
    assert layer_aux.item() == pytest.approx(expected, rel=1e-5)


def test_moe_output_is_a_weighted_sum_of_chosen_experts():
    torch.manual_seed(11)
    cfg = ModelConfig(vocab_size=64, hidden_size=16, num_heads=2, num_kv_heads=1, intermediate_size=32,
                      use_moe=True, num_experts=4, experts_per_token=2)
    moe = MoEFeedForward(cfg)
    x = torch.randn(1, 3, 16)
    with torch.no_grad():
        out, _ = moe(x)
    for i, token in enumerate(x[0]):
        probs = torch.softmax(moe.router(token), -1)
        top = probs.topk(2)
        w = top.values / top.values.sum()
        with torch.no_grad():
            expected = sum(w[j] * moe.experts[int(e)](token) for j, e in enumerate(top.indices))
        torch.testing.assert_close(out[0, i], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False}, {"use_moe": True}],
                         ids=["tied", "untied", "moe"])
def test_save_load_round_trip_gives_identical_logits(make_model, tmp_path, overrides):
    model = make_model(seed=12, **overrides)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    loaded = MiniMindLM.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    ids, mask = left_padded_batch([6, 3], vocab=64, seed=13)
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
    if model.config.tie_embeddings:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight
    else:
        assert not torch.equal(loaded.lm_head.weight, loaded.embed_tokens.weight)


def test_from_pretrained_rejects_corrupted_weights(make_model, tmp_path):
    make_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x13\x37 this is not a safetensors file" * 10)
    with pytest.raises(ValueError, match="model.safetensors") as info:
        MiniMindLM.from_pretrained(tmp_path)
    assert str(weights) in str(info.value)


def test_from_pretrained_rejects_truncated_weights_and_bad_config(make_model, tmp_path):
    make_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors"):
        MiniMindLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        MiniMindLM.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a minirlhf model dir"):
        MiniMindLM.from_pretrained(tmp_path / "missing")


def test_weights_of_another_shape_are_refused(make_model, tmp_path):
    make_model(hidden_size=32, num_heads=2, num_kv_heads=1).save_pretrained(tmp_path)
    other = make_model()
    other.config.save(tmp_path / "config.json")  # config says 64 wide, weights are 32 wide
    with pytest.raises(ValueError, match="model.safetensors"):
        MiniMindLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("name,low,high", [("tiny", 1e6, 3e6), ("mini", 25e6, 27e6), ("base", 95e6, 110e6)])
def test_preset_parameter_counts(name, low, high):
    with torch.device("meta"):
        model = MiniMindLM(preset(name))
    n = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    assert low <= n <= high, f"{name}: {n / 1e6:.2f}M parameters"
    assert n == model.num_parameters()


def test_unknown_preset_and_bad_head_split_are_errors():
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        preset("huge")
    with pytest.raises(ValueError, match="num_heads"):
        ModelConfig(hidden_size=64, num_heads=5)


@pytest.mark.skipif(not has_onednn_linear(), reason="this torch build has no oneDNN linear ops")
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_linear_is_x_times_w_transposed_forward_and_backward(monkeypatch, bias):
    """The models' linear sends large fp32 CPU products to oneDNN: y = x Wᵀ + b, dx = dy W, dW = dyᵀ x, db = Σ dy,
    checked against the formula in float64 (3-D input, as the model's plain forward passes), and takes
    `F.linear` where it should. `use_onednn_linears` retypes a model's plain linears in place."""
    from minirlhf.model import linear

    monkeypatch.setattr(linear, "onednn_beats_blas", lambda: True)  # as on an AMD CPU, whatever this one is
    g = torch.Generator().manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(96, 80, bias=bias))
    layer = linear.use_onednn_linears(plain)[0]
    assert type(layer) is linear.OneDNNLinear and list(dict(plain.named_parameters())) == (
        ["0.weight", "0.bias"] if bias else ["0.weight"])
    x = torch.randn(4, 300, 96, generator=g, requires_grad=True)  # 4 * 300 * 96 * 80 MACs > ONEDNN_MIN_MACS
    y = layer(x)
    assert type(y.grad_fn).__name__ == "_OneDNNLinearFunctionBackward"
    dy = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad(y, (x, *layer.parameters()), dy)
    x64, w64, dy64 = x.detach().double(), layer.weight.detach().double(), dy.double()
    b64 = layer.bias.detach().double() if bias else 0.0
    torch.testing.assert_close(y.double(), x64 @ w64.T + b64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0].double(), dy64 @ w64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1].double(), dy64.reshape(-1, 80).T @ x64.reshape(-1, 96), atol=1e-4, rtol=1e-5)
    if bias:
        torch.testing.assert_close(grads[2].double(), dy64.sum((0, 1)), atol=1e-4, rtol=1e-5)
    # F.linear: a product too small to pay for oneDNN's call, under autocast, or with the switch off
    assert type(layer(x[:1, :4]).grad_fn).__name__ != "_OneDNNLinearFunctionBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    monkeypatch.setattr(linear, "ONEDNN_CPU_LINEARS", False)
    assert type(layer(x).grad_fn).__name__ != "_OneDNNLinearFunctionBackward"
    monkeypatch.setattr(linear, "ONEDNN_CPU_LINEARS", True)
    monkeypatch.setattr(linear, "onednn_beats_blas", lambda: False)  # an Intel CPU: MKL's sgemm is the faster
    assert type(layer(x).grad_fn).__name__ != "_OneDNNLinearFunctionBackward"


@pytest.mark.parametrize(("vendor", "onednn"), [("GenuineIntel", False), ("AuthenticAMD", True), ("", True)])
def test_training_products_go_to_onednn_only_off_intel(monkeypatch, vendor, onednn):
    """MKL picks its sgemm path by CPU vendor: fast on Intel CPUs (oneDNN no faster there), slow elsewhere (AMD),
    so fp32 training products go to oneDNN only on non-Intel x86-64 CPUs that have its ops."""
    from minirlhf.model import linear

    assert linear.cpuinfo("no such field") == ""
    monkeypatch.setattr(linear, "cpuinfo", lambda field: vendor if field == "vendor_id" else "")
    monkeypatch.setattr(linear, "has_onednn_linear", lambda: True)
    assert linear.onednn_beats_blas.__wrapped__() is onednn
    monkeypatch.setattr(linear, "has_onednn_linear", lambda: False)
    assert linear.onednn_beats_blas.__wrapped__() is False


@pytest.mark.skipif(not has_onednn_linear(), reason="this torch build has no oneDNN linear ops")
@pytest.mark.parametrize("shared", [False, True])
def test_model_with_onednn_linears_equals_it_with_f_linear(monkeypatch, make_model, shared):
    """End to end: the native model's log-probs and every parameter gradient are the same with its products on
    oneDNN as on stock `F.linear` (float32 rounding apart), through the plain and the shared-prompt forward."""
    from minirlhf.logprobs import completion_logprobs
    from minirlhf.model import linear
    from minirlhf.model.minimind import SharedPrompt

    monkeypatch.setattr(linear, "ONEDNN_MIN_MACS", 0)  # every product of this tiny model, however small
    monkeypatch.setattr(linear, "onednn_beats_blas", lambda: True)  # and on oneDNN whatever this CPU is
    model = make_model(seed=0).train()
    assert type(model.lm_head(torch.randn(3, 64, requires_grad=True)).grad_fn).__name__ == (
        "_OneDNNLinearFunctionBackward")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (8, 40), generator=g)
    attention = torch.ones_like(ids)
    attention[1::2, :3] = 0  # left padding on some rows
    ids[:, :10] = ids[::2, :10].repeat_interleave(2, 0)  # rows 2k and 2k+1 share a 10-token prompt
    completion = torch.zeros_like(ids)
    completion[:, 10:] = 1
    prompt = SharedPrompt.of(torch.arange(8) // 2, 10) if shared else None
    results = []
    for on in (True, False):
        monkeypatch.setattr(linear, "ONEDNN_CPU_LINEARS", on)
        model.zero_grad(set_to_none=True)
        logps, mask = completion_logprobs(model, ids, attention, completion, shared_prompt=prompt)
        (logps * mask).sum().backward()
        results.append((logps.detach(), [p.grad.clone() for p in model.parameters()]))
    (on_logps, on_grads), (off_logps, off_grads) = results
    torch.testing.assert_close(on_logps, off_logps, atol=1e-5, rtol=1e-5)
    for on_grad, off_grad in zip(on_grads, off_grads):
        torch.testing.assert_close(on_grad, off_grad, atol=1e-5, rtol=1e-4)



@pytest.mark.parametrize("shared", [False, True])
def test_heads_run_in_float32_under_bf16_autocast(make_model, shared):
    """Under bf16 autocast the LM head's logits (plain and shared-prompt forward) and a scalar head's values are the
    float32 product of the final hidden states, not bf16-rounded ones, and the head's gradient is float32; without
    autocast the heads are plain products as before."""
    from minirlhf.model.heads import ScalarHeadModel
    from minirlhf.model.minimind import SharedPrompt

    model = make_model(seed=0).train()
    ids = torch.randint(3, model.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(2))
    ids[1::2, :5] = ids[::2, :5]  # rows 2k and 2k+1 share a 5-token prompt
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, return_hidden=True)
        shared_logits = model(ids, shared_prompt=SharedPrompt.of(torch.arange(4) // 2, 5)).logits
    expected = out.hidden.float() @ model.lm_head.weight.t()
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared_logits, expected[:, 4:-1], atol=1e-5, rtol=1e-5)
    rounded = out.hidden.bfloat16() @ model.lm_head.weight.bfloat16().t()  # what a bf16 head gives
    assert (rounded.float() - expected).abs().max() > 1e-3
    (shared_logits if shared else out.logits).sum().backward()
    assert model.lm_head.weight.grad.dtype == torch.float32

    scalar = ScalarHeadModel(make_model(seed=0)).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        values = scalar(ids)
        hidden = scalar.backbone(ids, return_hidden=True, return_logits=False).hidden
    torch.testing.assert_close(values, (hidden.float() @ scalar.head.weight.t() + scalar.head.bias).squeeze(-1),
                               atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        out = model(ids, return_hidden=True)
        assert torch.equal(out.logits, model.lm_head(out.hidden))


@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16], ids=["float32_out", "bf16_out"])
def test_rms_norm_forward_and_hand_written_backward_match_the_formula(out_dtype):
    """RMSNorm's forward and its written-out backward against the formula y = w x / sqrt(mean(x²) + eps), computed
    by hand in float64 with autograd's gradients, on a (2, 3, 8) input with a non-trivial weight; a bf16 output is
    the float32 result rounded once; gradients come back in the input's and the weight's dtypes."""
    from minirlhf.model.minimind import RMSNorm

    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(8, eps=1e-3)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(8, generator=g) + 0.5)
    x = (torch.randn(2, 3, 8, generator=g) * 3).requires_grad_()
    dy = torch.randn(2, 3, 8, generator=g)
    y = norm(x, out_dtype)
    (y.float() * dy).sum().backward()

    x64, w64 = x.detach().double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    y64 = w64 * x64 / torch.sqrt((x64 ** 2).mean(-1, keepdim=True) + 1e-3)
    (y64 * dy.to(y.dtype).double()).sum().backward()  # a bf16 output's gradient arrives rounded to bf16
    assert y.dtype == (out_dtype or torch.float32)
    torch.testing.assert_close(y, y64.to(y.dtype), atol=1e-6, rtol=1e-6 if out_dtype is None else 0)
    torch.testing.assert_close(x.grad, x64.grad.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norm.weight.grad, w64.grad.float(), atol=1e-5, rtol=1e-5)

    bf16_norm = RMSNorm(8, eps=1e-3).bfloat16()  # a bf16 model (no autocast): bf16 in, out and gradients
    xb = x.detach().bfloat16().requires_grad_()
    bf16_norm(xb).sum().backward()
    assert xb.grad.dtype == bf16_norm.weight.grad.dtype == torch.bfloat16
