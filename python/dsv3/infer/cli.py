"""`dsv3 generate --model DIR (--prompt TEXT | --input-file F | --interactive)`: text in, streamed text out,
with the tokenizer of the model directory (`tokenizer.json`, read by `tokenizers`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="HF-layout model directory (config.json, safetensors, tokenizer)"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--input-file", help="a text file with one prompt per line (generated as one batch)")
    src.add_argument(
        "--interactive", action="store_true", help="read prompts from standard input, one per line"
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--speculative", action="store_true", help="MTP speculative decoding (needs the MTP layer)"
    )
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: the checkpoint's")
    p.add_argument(
        "--fp8-cache", action="store_true", help="store the latent cache as FP8 (656 B/token at V3)"
    )
    p.add_argument("--cache-pages", type=int, default=512, help="64-token pages per layer (default 512)")


def run(args: argparse.Namespace) -> int:
    from tokenizers import Tokenizer

    from ..model import from_pretrained
    from .generate import Generator, SamplingParams

    model_dir = Path(args.model)
    tok_path = model_dir / "tokenizer.json"
    if not tok_path.exists():
        print(
            f"dsv3 generate: {tok_path} not found (the model directory needs its tokenizer)", file=sys.stderr
        )
        return 2
    tokenizer = Tokenizer.from_file(str(tok_path))
    model = from_pretrained(model_dir, dtype=getattr(torch, args.dtype) if args.dtype else None)
    eos = model.config.eos_token_id
    stops = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, stops, args.seed)
    gen = Generator(model, num_pages=args.cache_pages, fp8_cache=args.fp8_cache)

    def complete(prompts: list[str], stream: bool) -> None:
        ids = [tokenizer.encode(p).ids for p in prompts]
        printed = [""] * len(prompts)
        tokens: list[list[int]] = [[] for _ in prompts]

        def on_token(i: int, t: int) -> None:  # stream the text delta of a single prompt
            tokens[i].append(t)
            if stream:
                text = tokenizer.decode(tokens[i])
                # A byte-level token can end inside a UTF-8 character (decoded as U+FFFD): hold it back
                # until the character is complete.
                if text.startswith(printed[i]) and not text.endswith("\ufffd"):
                    sys.stdout.write(text[len(printed[i]) :])
                    sys.stdout.flush()
                    printed[i] = text

        outs = gen.generate(ids, params, speculative=args.speculative, on_token=on_token)
        for p, o in zip(prompts, outs, strict=True):
            text = tokenizer.decode(o.tokens)
            if stream:
                sys.stdout.write(text[len(printed[0]) :] + "\n")
            else:
                print(f"{p}{text}")
        s = gen.stats
        extra = f", MTP acceptance {s.acceptance_rate:.0%}" if args.speculative else ""
        print(
            f"[{s.decode_tokens} tokens, decode {s.decode_tokens_per_s:.1f} tok/s, prefill "
            f"{s.prefill_tokens_per_s:.1f} tok/s{extra}]",
            file=sys.stderr,
        )

    if args.prompt is not None:
        sys.stdout.write(args.prompt)
        complete([args.prompt], stream=True)
    elif args.input_file is not None:
        prompts = [
            line.rstrip("\n") for line in Path(args.input_file).read_text().splitlines() if line.strip()
        ]
        complete(prompts, stream=False)
    else:
        for line in sys.stdin:
            if line.strip():
                sys.stdout.write(line.rstrip("\n"))
                complete([line.rstrip("\n")], stream=True)
    return 0
