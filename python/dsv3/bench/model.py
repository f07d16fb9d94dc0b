"""Model benchmark: a preset model end to end against transformers' DeepseekV3ForCausalLM (same weights).

dsv3 and Hugging Face transformers' `DeepseekV3ForCausalLM`, loaded from the same checkpoint, run side by side
in one process.

Cases:
  prefill      dsv3 `model(input_ids)` vs transformers `model(input_ids, use_cache=False)`: batch x prompt-len
               tokens through the full forward (logits of every position), tokens/s
  generate     greedy generation of new-tokens per prompt: dsv3 `Generator.generate` (paged latent cache,
               `mla_decode`) vs transformers `generate(do_sample=False, min_new_tokens=N)`; end-to-end
               tokens/s counting generated tokens only (prefill included in the time, nothing subtracted),
               dsv3's decode-only tokens/s (GenerationStats), and the fraction of greedy tokens that agree
  speculative  the same generation with MTP speculative decoding: tokens/s, acceptance rate, speed-up over
               plain dsv3 generation (the preset's MTP layer is random, so its drafts are rarely accepted)
  cache bytes  bytes per token per layer of dsv3's latent cache (kv_lora_rank + qk_rope_head_dim values, bf16
               or the packed FP8 layout) vs a per-head K/V cache (num_heads x (qk_head_dim + v_head_dim) bf16
               values, what transformers stores), for the preset and for v3-671b (arithmetic on the configs)
transformers is optional: without it only dsv3's numbers are reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time

import torch

from dsv3 import ops
from dsv3.infer import GenerationStats, Generator, SamplingParams
from dsv3.model import ModelConfig, build_model, from_pretrained
from dsv3.model.checkpoint import save_pretrained

from .common import environment_line, load_transformers, write_json
from .timing import time_side_by_side

TARGET_GENERATE = 3.0  # SPEC §8: generation on the tiny preset >= 3x transformers' tokens/s


def cache_bytes(cfg: ModelConfig) -> dict:
    """Bytes per token per layer: dsv3's latent cache (bf16, FP8 layout) and a per-head bf16 K/V cache."""
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    latent = width * 2
    fp8 = ops.mla_fp8_token_bytes(width, cfg.kv_lora_rank)
    per_head = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 2
    return {
        "latent_bf16": latent,
        "latent_fp8": fp8,
        "per_head_bf16": per_head,
        "ratio_bf16": per_head / latent,
        "ratio_fp8": per_head / fp8,
    }


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of positions where two batches of generated token lists agree (lengths must match)."""
    pairs = [(x, y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    return sum(x == y for x, y in pairs) / len(pairs)


def run_bench(preset: str, dtype: torch.dtype, batch: int, prompt_len: int, new_tokens: int, quick: bool):
    """Returns (rows, notes). Every row is a dict with a "case" key."""
    cfg = ModelConfig.preset(preset)
    dtype_name = str(dtype).removeprefix("torch.")
    cfg = dataclasses.replace(cfg, torch_dtype=dtype_name).validate()
    timing = dict(min_rounds=1, max_rounds=2, target_s=0.0) if quick else dict(min_rounds=3, target_s=2.0)
    notes = []
    gen_ids = torch.Generator().manual_seed(1234)
    prompt_ids = torch.randint(2, cfg.vocab_size, (batch, prompt_len), generator=gen_ids)
    prompts = prompt_ids.tolist()
    auto = load_transformers()
    if auto is None:
        notes.append("transformers is not installed: dsv3 only (pip install transformers for the baseline)")
    with tempfile.TemporaryDirectory(prefix="dsv3-bench-model-") as tmp:
        save_pretrained(build_model(cfg, dtype=dtype, seed=0), tmp, cfg)
        model = from_pretrained(tmp, dtype=dtype).eval()
        hf = None
        if auto is not None:
            from transformers.utils import logging as hf_logging

            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # no MTP layer in transformers: it warns about its weights
            try:
                hf = auto.from_pretrained(tmp, dtype=dtype).eval()
            finally:
                hf_logging.set_verbosity(verbosity)
            hf.generation_config.eos_token_id = None  # never stop early, as dsv3 runs without stop tokens
            hf.generation_config.pad_token_id = 0
    rows = []

    # ---- prefill -----------------------------------------------------------------------------------------
    fns = {"dsv3": lambda: model(prompt_ids)}
    if hf is not None:
        fns["transformers"] = lambda: hf(prompt_ids, use_cache=False).logits
    with torch.inference_mode():
        times = time_side_by_side(fns, **timing)
    tokens = batch * prompt_len
    row = {"case": "prefill", "tokens": tokens, "times": times}
    row.update({f"{n}_tokens_per_s": tokens / t["median_s"] for n, t in times.items()})
    if hf is not None:
        row["speedup"] = times["transformers"]["median_s"] / times["dsv3"]["median_s"]
    rows.append(row)

    # ---- generation: plain greedy, MTP speculative, transformers ------------------------------------------
    params = SamplingParams(max_new_tokens=new_tokens)
    plain_gen, spec_gen = Generator(model), Generator(model)
    results: dict[str, list] = {"dsv3": [], "dsv3_speculative": [], "transformers": []}

    def run_dsv3(gen: Generator, speculative: bool, key: str):
        gen.stats = GenerationStats()
        outs = gen.generate(prompts, params, speculative=speculative)
        results[key].append(([o.tokens for o in outs], gen.stats))

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(
                prompt_ids,
                attention_mask=torch.ones_like(prompt_ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
            )
        results["transformers"].append((out[:, prompt_len:].tolist(), None))

    fns = {
        "dsv3": lambda: run_dsv3(plain_gen, False, "dsv3"),
        "dsv3_speculative": lambda: run_dsv3(spec_gen, True, "dsv3_speculative"),
    }
    if hf is not None:
        fns["transformers"] = run_hf
    times = time_side_by_side(fns, **timing)
    generated = batch * new_tokens
    plain_tokens = results["dsv3"][0][0]
    assert all(len(t) == new_tokens for t in plain_tokens), "dsv3 generated fewer tokens than asked"
    decode_tps = statistics.median(s.decode_tokens_per_s for _, s in results["dsv3"])
    row = {
        "case": "generate",
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "generated_tokens": generated,
        "times": {n: times[n] for n in ("dsv3", "transformers") if n in times},
        "dsv3_tokens_per_s": generated / times["dsv3"]["median_s"],
        "dsv3_decode_tokens_per_s": decode_tps,
    }
    if hf is not None:
        hf_tokens = results["transformers"][0][0]
        assert all(len(t) == new_tokens for t in hf_tokens), "transformers generated fewer tokens than asked"
        row["transformers_tokens_per_s"] = generated / times["transformers"]["median_s"]
        row["speedup"] = times["transformers"]["median_s"] / times["dsv3"]["median_s"]
        row["target_speedup"] = TARGET_GENERATE
        row["greedy_agreement"] = agreement(plain_tokens, hf_tokens)
        row["greedy_equal"] = plain_tokens == hf_tokens
        if dtype == torch.float32 and not row["greedy_equal"]:
            notes.append(
                f"float32 greedy tokens differ from transformers (agreement {row['greedy_agreement']:.3f})"
            )
    rows.append(row)

    spec_tokens, _ = results["dsv3_speculative"][0]
    spec_stats = results["dsv3_speculative"]
    drafted = sum(s.drafted for _, s in spec_stats)
    accepted = sum(s.accepted for _, s in spec_stats)
    rows.append(
        {
            "case": "speculative",
            "generated_tokens": generated,
            "times": {"dsv3_speculative": times["dsv3_speculative"]},
            "dsv3_tokens_per_s": generated / times["dsv3_speculative"]["median_s"],
            "dsv3_decode_tokens_per_s": statistics.median(s.decode_tokens_per_s for _, s in spec_stats),
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "steps_per_token": statistics.median(s.steps for _, s in spec_stats) / new_tokens,
            "speedup_vs_plain": times["dsv3"]["median_s"] / times["dsv3_speculative"]["median_s"],
            "equal_to_plain": spec_tokens == plain_tokens,
        }
    )
    notes.append(
        f"the {preset} preset's MTP layer is randomly initialized (not trained), so its drafts are rarely "
        "accepted and speculative decoding costs more than it saves; a trained MTP module is accepted "
        "85-90% of the time (DeepSeek-V3 report)"
    )

    # ---- cache bytes per token per layer -----------------------------------------------------------------
    for name, c in ((preset, cfg), ("v3-671b", ModelConfig.preset("v3-671b"))):
        rows.append({"case": "cache_bytes", "preset": name, **cache_bytes(c)})
    return rows, notes


def print_table(rows: list[dict], notes: list[str], args) -> None:
    by_case = {r["case"]: r for r in rows if r["case"] != "cache_bytes"}
    pre, gen, spec = by_case["prefill"], by_case["generate"], by_case["speculative"]
    have_hf = "transformers_tokens_per_s" in gen

    def hf_cell(r: dict, key: str = "transformers_tokens_per_s") -> str:
        return f"{r[key]:>14.0f}" if key in r else f"{'-':>14}"

    def ratio_cell(r: dict, key: str = "speedup") -> str:
        return f"{r[key]:>8.2f}x" if key in r else f"{'-':>9}"

    head = f"{'case':<34} | {'dsv3 tok/s':>11} {'transformers':>14} {'dsv3 / hf':>9} | notes"
    print(head)
    print("-" * len(head))
    print(
        f"{f'prefill ({args.batch} x {args.prompt_len})':<34} | {pre['dsv3_tokens_per_s']:>11.0f} "
        f"{hf_cell(pre)} {ratio_cell(pre)} | full forward, logits of every position"
    )
    agree = f"greedy agreement {gen['greedy_agreement']:.3f}" if have_hf else "no baseline"
    target = f"target >= {TARGET_GENERATE:.0f}x, " if have_hf else ""
    print(
        f"{f'generate ({args.batch} x {args.new_tokens} new)':<34} | {gen['dsv3_tokens_per_s']:>11.0f} "
        f"{hf_cell(gen)} {ratio_cell(gen)} | {target}{agree}"
    )
    print(
        f"{'  dsv3 decode only':<34} | {gen['dsv3_decode_tokens_per_s']:>11.0f} {'':>14} {'':>9} | "
        "GenerationStats (prefill excluded)"
    )
    print(
        f"{'generate, MTP speculative':<34} | {spec['dsv3_tokens_per_s']:>11.0f} {'':>14} {'':>9} | "
        f"acceptance {spec['acceptance_rate']:.0%}, {spec['speedup_vs_plain']:.2f}x plain dsv3, "
        f"{spec['steps_per_token']:.2f} steps/token, same tokens: {spec['equal_to_plain']}"
    )
    print()
    head = (
        f"{'cache bytes / token / layer':<28} | {'latent bf16':>11} {'latent fp8':>10} "
        f"{'per-head bf16':>13} | {'ratio bf16':>10} {'ratio fp8':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        if r["case"] == "cache_bytes":
            print(
                f"{r['preset']:<28} | {r['latent_bf16']:>11} {r['latent_fp8']:>10} "
                f"{r['per_head_bf16']:>13} | {r['ratio_bf16']:>9.1f}x {r['ratio_fp8']:>8.1f}x"
            )
    for n in notes:
        print(f"note: {n}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dsv3 bench model", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", help="ModelConfig preset (default tiny)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, help="prompts per batch (default 4, --quick 2)")
    p.add_argument("--prompt-len", type=int, help="tokens per prompt (default 64, --quick 16)")
    p.add_argument("--new-tokens", type=int, help="generated tokens per prompt (default 64, --quick 8)")
    p.add_argument("--json", default="bench-results/model.json", help="where to write the results")
    p.add_argument(
        "--quick", action="store_true", help="batch 2, prompt 16, 8 new tokens, few rounds (a smoke run)"
    )
    args = p.parse_args(argv)
    for name, default, quick in (("batch", 4, 2), ("prompt_len", 64, 16), ("new_tokens", 64, 8)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    t0 = time.perf_counter()
    rows, notes = run_bench(
        args.preset, getattr(torch, args.dtype), args.batch, args.prompt_len, args.new_tokens, args.quick
    )
    print(environment_line(f"preset {args.preset}", args.dtype))
    print_table(rows, notes, args)
    print(f"({time.perf_counter() - t0:.0f} s)")
    write_json(args.json, "cpu", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
