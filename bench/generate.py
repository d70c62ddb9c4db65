"""Generation throughput: our KV-cache sampler vs Hugging Face `transformers` `generate`, same weights.

The native model (random init, seeded) is exported with `export_hf` and reloaded with
`AutoModelForCausalLM.from_pretrained`, so both engines run identical float32 weights in the same process
with the same thread count. Both sample from softmax(logits / T) with the same top-k, from the same
random prompts (no padding, so each row's attention mask is all ones; HF is given it explicitly).

Both engines must produce exactly `--new-tokens` tokens per row, so neither may stop early:
- ours gets `eos_id=-1`, an id the sampler can never return, so no row ever finishes;
- HF gets `eos_token_id=None` (the exported config has no EOS either) plus `min_new_tokens=max_new_tokens`,
  so it has no EOS stopping criterion and stops only at the length limit.
The output lengths are checked. Each engine gets one warm-up run, then the median of `--runs` timed runs,
interleaved across engines.

Each precision is compared like for like: `fp32` (both engines in float32) and `bf16` (ours samples from bf16
copies of its weights, `generate(..., dtype=torch.bfloat16)`; HF runs the model cast to bfloat16). On CPU our
decode step multiplies by fused q/k/v and gate/up matrices packed once per call for oneDNN
(`minirlhf.generation.decode`; packing is inside the timed call) and the prefill's products run on oneDNN
(`minirlhf.model.linear`, non-Intel x86 CPUs); `--plain` also times ours with both switched off (stock
`F.linear`, as HF uses), so the effects can be told apart.

    python bench/generate.py [--preset mini --batch 16 --prompt-len 32 --new-tokens 128 --runs 3 --dtype both]

Prints one JSON object: tokens/s counts new tokens only (batch * new_tokens / seconds, prefill included).
On CPU, `step_floor` sets each engine against the least time a decode step can take on this machine (a roofline):
the longer of reading what it must read, every weight matrix (the LM head included) in the engine's precision plus
the cached keys and values it attends to (ours keeps its cache in float32 in both precisions, HF in the model's
dtype; the mean over the generation), at the rate this machine re-reads that many bytes (`read_gb_s`: a step's
weights may stay in the last-level cache from one step to the next), and doing its products at the rate of a large
product in that precision (`product_gflop_s`, `common.matmul_gflops`). `share_of_floor` is that floor over the
engine's measured milliseconds per new token (prefill included, so a little below what the decode step alone
reaches), and `speedup_ceiling` HF's measured step over our floor: the most any sampler doing our work could be
faster than HF here.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
import warnings

import torch
from common import matmul_gflops, read_bandwidth_gbs, use_aten_linears
from torch import nn

from minirlhf.generation import SamplingConfig, generate
from minirlhf.model import MiniMindLM, preset
from minirlhf.model.hf_export import export_hf


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_interleaved(engines: dict, runs: int, device: str) -> dict[str, list[float]]:
    """One warm-up call per engine, then `runs` rounds that time each engine once, in turn (so a change in
    machine load hits every engine alike)."""
    for fn in engines.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(runs):
        for name, fn in engines.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def step_floor(model: MiniMindLM, args: argparse.Namespace, dtypes: dict[str, torch.dtype],
               seconds: dict[str, float]) -> dict:
    """Each engine's measured step against the least time a decode step can take here (see the module docstring)."""
    config = model.config
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    mean_keys = args.prompt_len + args.new_tokens / 2  # keys attended to, averaged over the decode steps
    cached = config.num_layers * 2 * args.batch * config.num_kv_heads * config.head_dim * mean_keys
    flops = 2 * args.batch * weights + 2 * cached * (config.num_heads // config.num_kv_heads)  # products, attention
    rates = {name: max(matmul_gflops(config.hidden_size, repeats=10, dtype=dtype).values())
             for name, dtype in dtypes.items()}
    step_bytes, bandwidth, floor_ms, measured_ms = {}, {}, {}, {}
    for name, dtype in dtypes.items():
        size = torch.finfo(dtype).bits // 8
        for engine, cache_size in (("ours", 4), ("hf", size)):
            key = f"{engine}_{name}"
            step_bytes[key] = weights * size + cached * cache_size
            bandwidth[key] = read_bandwidth_gbs(step_bytes[key] / 2**20)
            floor_ms[key] = max(step_bytes[key] / bandwidth[key] / 1e6, flops / rates[name] / 1e6)
            measured_ms[key] = seconds[key] / args.new_tokens * 1e3
    return {
        "read_gb_s": bandwidth,
        "product_gflop_s": rates,
        "gflop_per_step": round(flops / 1e9, 2),
        "bytes_per_step_mb": {k: round(v / 1e6, 1) for k, v in step_bytes.items()},
        "floor_ms_per_step": {k: round(v, 2) for k, v in floor_ms.items()},
        "ms_per_step": {k: round(v, 2) for k, v in measured_ms.items()},
        "share_of_floor": {k: round(floor_ms[k] / measured_ms[k], 2) for k in floor_ms},
        "speedup_ceiling": {name: round(measured_ms[f"hf_{name}"] / floor_ms[f"ours_{name}"], 2) for name in dtypes},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per engine (after one warm-up); median")
    parser.add_argument("--top-k", type=int, default=0, help="0 = no top-k filtering (both engines)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = leave torch's default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both",
                        help="precision of both engines (both: the fp32 pair and the bf16 pair)")
    parser.add_argument("--plain", action="store_true", help="also time our fp32 sampler on stock F.linear")
    args = parser.parse_args(argv)

    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = preset(args.preset, max_seq_len=max(preset(args.preset).max_seq_len, args.prompt_len + args.new_tokens))
    ours = MiniMindLM(config).eval().to(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        export_hf(ours, tmp, eos_id=None, pad_id=0)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval().to(args.device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if args.dtype != "both":
        dtypes = {args.dtype: dtypes[args.dtype]}
    hf_models = {name: hf if dtype == torch.float32 else copy.deepcopy(hf).to(dtype) for name, dtype in dtypes.items()}

    g = torch.Generator().manual_seed(args.seed + 1)
    prompt_ids = torch.randint(0, config.vocab_size, (args.batch, args.prompt_len), generator=g)
    prompts = prompt_ids.tolist()
    hf_ids = prompt_ids.to(args.device)
    hf_mask = torch.ones_like(hf_ids)
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=args.temperature, top_k=args.top_k)

    def run_ours(dtype: torch.dtype) -> None:
        rollout = generate(ours, prompts, sampling, eos_id=-1, pad_id=0, dtype=dtype,
                           generator=torch.Generator(device=args.device).manual_seed(args.seed))
        assert rollout.completion_ids.shape == (args.batch, args.new_tokens), rollout.completion_ids.shape
        assert bool(rollout.completion_mask.all())

    def run_hf(model) -> None:
        with torch.no_grad():
            out = model.generate(
                input_ids=hf_ids, attention_mask=hf_mask, do_sample=True, temperature=args.temperature,
                top_k=args.top_k, top_p=1.0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                eos_token_id=None, pad_token_id=0,
            )
        assert out.shape == (args.batch, args.prompt_len + args.new_tokens), out.shape

    def run_ours_plain() -> None:
        use_aten_linears()
        try:
            run_ours(torch.float32)
        finally:
            use_aten_linears(False)

    engines = {}
    for name, dtype in dtypes.items():
        engines[f"ours_{name}"] = lambda dtype=dtype: run_ours(dtype)
        engines[f"hf_{name}"] = lambda name=name: run_hf(hf_models[name])
    if args.plain:
        engines["ours_plain_fp32"] = run_ours_plain
    times = _time_interleaved(engines, args.runs, args.device)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    new_tokens = args.batch * args.new_tokens
    result = {
        "device": args.device,
        "threads": torch.get_num_threads(),
        "preset": args.preset,
        "params": ours.num_parameters(),
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "top_k": args.top_k,
        "temperature": args.temperature,
        "runs": args.runs,
        "seconds": {name: [round(x, 3) for x in t] for name, t in times.items()},
        "tokens_per_s": {name: round(new_tokens / s, 1) for name, s in seconds.items()},
        "speedup": {name: round(seconds[f"hf_{name}"] / seconds[f"ours_{name}"], 2) for name in dtypes},
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if args.plain:
        result["speedup"]["fp32_plain"] = round(seconds["hf_fp32"] / seconds["ours_plain_fp32"], 2)
    if args.device == "cpu":
        result["step_floor"] = step_floor(ours, args, dtypes, seconds)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
