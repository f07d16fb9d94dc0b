"""`dsv3 generate` end to end: a tiny model with a byte-level BPE tokenizer trained here, run as a
subprocess; its greedy text equals the decoded greedy continuation of transformers' DeepseekV3ForCausalLM on
the same checkpoint, for a single prompt, a batch from a file, stdin, and MTP speculative decoding."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsv3
from dsv3.model import ModelConfig, build_model
from dsv3.model.checkpoint import save_pretrained

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

README = Path(__file__).resolve().parents[2] / "README.md"
NEW_TOKENS = 8
PROMPTS = ["The model reads", "CUDA kernels and", "pip install torch"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A checkpoint directory: the tiny preset in float32 with the vocabulary of a byte-level BPE tokenizer
    trained on the README (<s> and </s> as BOS/EOS), and that tokenizer's tokenizer.json."""
    root = tmp_path_factory.mktemp("generate_cli")
    tok = tokenizers.ByteLevelBPETokenizer()
    tok.train_from_iterator(README.read_text().splitlines(), vocab_size=400, special_tokens=["<s>", "</s>"])
    (root / "tok").mkdir()
    tok.save(str(root / "tok" / "tokenizer.json"))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    cfg = dataclasses.replace(
        ModelConfig.preset("tiny"),
        vocab_size=tok.get_vocab_size(),
        bos_token_id=bos,
        eos_token_id=eos,
        torch_dtype="float32",
    ).validate()
    model = build_model(cfg, dtype=torch.float32, seed=5)
    with torch.no_grad():  # sharper next-token distributions than the preset's 0.006-std init gives
        model.lm_head.weight.mul_(20)
    save_pretrained(model, root / "model", cfg, tokenizer_dir=root / "tok")
    save_pretrained(model, root / "no_tokenizer", cfg)
    return root


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return tokenizers.Tokenizer.from_file(str(model_dir / "model" / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_text(model_dir, tokenizer):
    """prompt -> the decoded greedy continuation of transformers' model on the same checkpoint (up to EOS)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir / "model", dtype=torch.float32).eval()
    eos = hf.config.eos_token_id
    hf.generation_config.pad_token_id = eos
    cache = {}

    def continuation(prompt: str) -> str:
        if prompt not in cache:
            ids = torch.tensor([tokenizer.encode(prompt).ids])
            with torch.no_grad():
                out = hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, ids.shape[1] :].tolist()
            if eos in out:
                out = out[: out.index(eos)]
            cache[prompt] = tokenizer.decode(out)
        return cache[prompt]

    return continuation


def generate_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Runs `python -m dsv3.cli generate ARGS`; stdout and stderr decoded as UTF-8 without newline
    translation (the generated text may hold a "\r")."""
    package_parent = str(Path(dsv3.__file__).resolve().parent.parent)
    path = os.pathsep.join([package_parent, *filter(None, [os.environ.get("PYTHONPATH")])])
    r = subprocess.run(
        [sys.executable, "-m", "dsv3.cli", "generate", *args],
        input=None if stdin is None else stdin.encode(),
        capture_output=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": path, "PYTHONIOENCODING": "utf-8"},
    )
    r.stdout, r.stderr = r.stdout.decode(), r.stderr.decode()
    return r


def test_tokenizer_and_config(model_dir, tokenizer):
    cfg = ModelConfig.from_pretrained(model_dir / "model")
    assert 300 <= cfg.vocab_size == tokenizer.get_vocab_size() <= 512
    assert (
        tokenizer.id_to_token(cfg.bos_token_id) == "<s>" and tokenizer.id_to_token(cfg.eos_token_id) == "</s>"
    )
    assert tokenizer.decode(tokenizer.encode(PROMPTS[0]).ids) == PROMPTS[0]


def test_prompt_streams_transformers_greedy_text(model_dir, hf_text):
    r = generate_cli("--model", str(model_dir / "model"), "--prompt", PROMPTS[0], "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(PROMPTS[0])
    assert r.stdout == PROMPTS[0] + hf_text(PROMPTS[0]) + "\n"
    assert len(hf_text(PROMPTS[0])) > 0
    assert "tok/s" in r.stderr


def test_input_file_prints_one_line_per_prompt(model_dir, hf_text, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n\n")  # the blank line is skipped
    r = generate_cli("--model", str(model_dir / "model"), "--input-file", str(f), "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    # One line per prompt, in order (a generated text may itself hold a line break: compared exactly).
    assert r.stdout == "".join(f"{p}{hf_text(p)}\n" for p in PROMPTS)
    newlines = sum(hf_text(p).count("\n") for p in PROMPTS)
    assert r.stdout.count("\n") == 3 + newlines


def test_speculative_gives_greedy_text(model_dir, hf_text):
    r = generate_cli(
        "--model", str(model_dir / "model"), "--prompt", PROMPTS[1], "--max-new-tokens", "8", "--speculative"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == PROMPTS[1] + hf_text(PROMPTS[1]) + "\n"
    assert "MTP acceptance" in r.stderr


def test_interactive_reads_stdin_lines(model_dir, hf_text):
    r = generate_cli(
        "--model",
        str(model_dir / "model"),
        "--interactive",
        "--max-new-tokens",
        "8",
        stdin=f"{PROMPTS[2]}\n\n{PROMPTS[0]}\n",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{PROMPTS[2]}{hf_text(PROMPTS[2])}\n{PROMPTS[0]}{hf_text(PROMPTS[0])}\n"
    assert r.stderr.count("decode ") == 2  # one statistics line per prompt


def test_directory_without_tokenizer_exits_2(model_dir):
    r = generate_cli("--model", str(model_dir / "no_tokenizer"), "--prompt", "hi", "--max-new-tokens", "2")
    assert r.returncode == 2
    assert "tokenizer.json not found" in r.stderr and r.stdout == ""
