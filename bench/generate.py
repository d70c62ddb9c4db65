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

On CPU our sampler runs the fp32 linears through oneDNN with weights packed once per `generate` call
(`minirlhf.generation.sampler.PACK_CPU_LINEARS`; packing is inside the timed call). `ours_plain_*` times the
same sampler with that switched off (stock `F.linear`, as HF uses), so the two effects can be told apart;
`--no-plain` skips it.

    python bench/generate.py [--preset mini --batch 16 --prompt-len 32 --new-tokens 128 --runs 3 --device cpu]

Prints one JSON object: tokens/s counts new tokens only (batch * new_tokens / seconds, prefill included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings

import torch

from minirlhf.generation import SamplingConfig, generate, sampler
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
    parser.add_argument("--no-plain", action="store_true", help="skip timing our sampler without packed linears")
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

    g = torch.Generator().manual_seed(args.seed + 1)
    prompt_ids = torch.randint(0, config.vocab_size, (args.batch, args.prompt_len), generator=g)
    prompts = prompt_ids.tolist()
    hf_ids = prompt_ids.to(args.device)
    hf_mask = torch.ones_like(hf_ids)
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=args.temperature, top_k=args.top_k)

    def run_ours():
        rollout = generate(ours, prompts, sampling, eos_id=-1, pad_id=0,
                           generator=torch.Generator(device=args.device).manual_seed(args.seed))
        assert rollout.completion_ids.shape == (args.batch, args.new_tokens), rollout.completion_ids.shape
        assert bool(rollout.completion_mask.all())

    def run_hf():
        with torch.no_grad():
            out = hf.generate(
                input_ids=hf_ids, attention_mask=hf_mask, do_sample=True, temperature=args.temperature,
                top_k=args.top_k, top_p=1.0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                eos_token_id=None, pad_token_id=0,
            )
        assert out.shape == (args.batch, args.prompt_len + args.new_tokens), out.shape

    def run_ours_plain():
        sampler.PACK_CPU_LINEARS = False
        try:
            run_ours()
        finally:
            sampler.PACK_CPU_LINEARS = True

    engines = {"ours": run_ours, "hf": run_hf}
    if not args.no_plain:
        engines["ours_plain"] = run_ours_plain
    times = _time_interleaved(engines, args.runs, args.device)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    new_tokens = args.batch * args.new_tokens
    plain_s = seconds.get("ours_plain")
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
        "ours_tokens_per_s": round(new_tokens / seconds["ours"], 1),
        "hf_tokens_per_s": round(new_tokens / seconds["hf"], 1),
        "speedup": round(seconds["hf"] / seconds["ours"], 2),
        "ours_plain_tokens_per_s": plain_s and round(new_tokens / plain_s, 1),
        "speedup_plain": plain_s and round(seconds["hf"] / plain_s, 2),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
