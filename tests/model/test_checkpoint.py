"""Checkpoint I/O: HF name adapter, bit-exact save/load round trips (BF16, FP32, FP8), sharding, BF16 <-> FP8
conversion and cross-precision loading, rank-aware expert loading, key errors, atomic writes, the CLI, and
interop with transformers' DeepseekV3ForCausalLM."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv3 import ops
from dsv3.cli import main as cli_main
from dsv3.model import ModelConfig, build_model
from dsv3.model import checkpoint as ckpt
from dsv3.model.checkpoint import (
    FP8_QUANTIZATION_CONFIG,
    checkpoint_files,
    convert_checkpoint,
    hf_to_internal,
    internal_to_hf,
    load_weights,
    save_pretrained,
)

FP8 = torch.float8_e4m3fn
QUANTIZABLE = ckpt._QUANTIZABLE


def tiny(fp8: bool = False, **overrides) -> ModelConfig:
    cfg = ModelConfig.preset("tiny")
    return dataclasses.replace(
        cfg, quantization_config=dict(FP8_QUANTIZATION_CONFIG) if fp8 else None, **overrides
    )


def random_model(cfg: ModelConfig, dtype=torch.bfloat16, expert_ids=None):
    """Every tensor random (norms and the router bias too), so a round trip that drops or swaps one shows."""
    model = build_model(cfg, dtype=dtype, expert_ids=expert_ids, init=True)  # random block-quantized FP8
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if t.is_floating_point() and t.dtype != FP8 and not name.endswith("_scale_inv"):
                t.copy_(torch.randn(t.shape))
    return model


def blank_model(cfg: ModelConfig, dtype=torch.bfloat16, expert_ids=None):
    return build_model(
        cfg, dtype=dtype, expert_ids=None if expert_ids is None else torch.tensor(expert_ids), init=False
    )


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == FP8:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    bad = [k for k in sa if not same(sa[k], sb[k])]
    assert not bad, bad


def read_dir(path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(set(checkpoint_files(path).values())):
        out.update(load_file(file))
    return out


def test_name_adapter():
    assert hf_to_internal("model.layers.3.mlp.experts.7.up_proj.weight") == (
        "model.layers.3.mlp.experts.up_proj",
        7,
    )
    assert hf_to_internal("model.layers.1.mlp.experts.12.down_proj.weight_scale_inv") == (
        "model.layers.1.mlp.experts.down_proj_scale_inv",
        12,
    )
    for name in [
        "model.layers.1.mlp.shared_experts.gate_proj.weight",
        "model.layers.1.mlp.gate.weight",
        "lm_head.weight",
    ]:
        assert hf_to_internal(name) == (name, None)
    stacked = torch.randn(2, 3, 4)
    split = internal_to_hf("model.layers.1.mlp.experts.gate_proj_scale_inv", stacked, [2, 5])
    assert [n for n, _ in split] == [
        "model.layers.1.mlp.experts.2.gate_proj.weight_scale_inv",
        "model.layers.1.mlp.experts.5.gate_proj.weight_scale_inv",
    ]
    assert torch.equal(split[1][1], stacked[1])
    for hf_name, _ in split:
        assert hf_to_internal(hf_name)[0] == "model.layers.1.mlp.experts.gate_proj_scale_inv"
    assert internal_to_hf("model.norm.weight", stacked, None)[0][0] == "model.norm.weight"
    with pytest.raises(ValueError, match="expert_ids"):
        internal_to_hf("model.layers.1.mlp.experts.up_proj", stacked, [1, 2, 3])


@pytest.mark.parametrize(
    ("fp8", "dtype"), [(False, torch.bfloat16), (False, torch.float32), (True, torch.bfloat16)]
)
def test_round_trip_is_bit_exact(tmp_path, fp8, dtype):
    cfg = tiny(fp8)
    model = random_model(cfg, dtype)
    shards = save_pretrained(model, tmp_path / "ckpt", cfg)
    assert shards == ["model.safetensors"] and not (tmp_path / "ckpt" / ckpt.INDEX_FILE).exists()
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["torch_dtype"] == str(dtype).removeprefix("torch.")
    assert config.get("quantization_config") == (FP8_QUANTIZATION_CONFIG if fp8 else None)
    assert ModelConfig.from_pretrained(tmp_path / "ckpt") == dataclasses.replace(
        cfg, torch_dtype=config["torch_dtype"]
    )

    on_disk = read_dir(tmp_path / "ckpt")
    assert on_disk["model.layers.2.mlp.experts.7.down_proj.weight"].shape == (
        cfg.hidden_size,
        cfg.moe_intermediate_size,
    )
    assert on_disk["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    scales = {n for n in on_disk if n.endswith("weight_scale_inv")}
    quantized = {n + "_scale_inv" for n in on_disk if QUANTIZABLE.match(n)}
    assert scales == (quantized if fp8 else set())

    loaded = blank_model(cfg, dtype)
    report = load_weights(loaded, tmp_path / "ckpt")
    assert not report.missing and not report.unexpected and not report.skipped_experts
    assert_same_state(model, loaded)


def test_sharded_save_streams_back_one_tensor_at_a_time(tmp_path, monkeypatch):
    cfg = tiny(fp8=True)
    model = random_model(cfg)
    shards = save_pretrained(model, tmp_path / "ckpt", cfg, max_shard_bytes=300_000)
    n = len(shards)
    assert n > 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((tmp_path / "ckpt" / ckpt.INDEX_FILE).read_text())
    on_disk = read_dir(tmp_path / "ckpt")
    assert sorted(index["weight_map"]) == sorted(on_disk) and set(index["weight_map"].values()) == set(shards)
    sizes = {k: v.numel() * v.element_size() for k, v in on_disk.items()}
    assert index["metadata"]["total_size"] == sum(sizes.values())
    assert all(t.is_contiguous() for t in on_disk.values())

    reads = spy_reads(monkeypatch)
    loaded = blank_model(cfg)
    report = load_weights(loaded, tmp_path / "ckpt")
    assert_same_state(model, loaded)
    # Each tensor read once, alone: the loader's peak beyond the model is its largest tensor, not a shard.
    assert sorted(reads) == sorted(on_disk)
    assert report.bytes_read == index["metadata"]["total_size"]
    assert report.max_tensor_bytes == max(sizes.values())


def spy_reads(monkeypatch) -> list[str]:
    """Records every tensor name the checkpoint module reads through safe_open."""
    reads: list[str] = []
    real = ckpt.safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self._file = real(*args, **kwargs)

        def __enter__(self):
            self._handle = self._file.__enter__()
            return self

        def __exit__(self, *exc):
            return self._file.__exit__(*exc)

        def keys(self):
            return self._handle.keys()

        def get_slice(self, name):
            return self._handle.get_slice(name)

        def get_tensor(self, name):
            reads.append(name)
            return self._handle.get_tensor(name)

    monkeypatch.setattr(ckpt, "safe_open", Spy)
    return reads


def test_save_casts_floating_tensors_but_not_router_bias(tmp_path):
    cfg = tiny()
    model = random_model(cfg, torch.float32)
    save_pretrained(model, tmp_path / "ckpt", cfg, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    on_disk = read_dir(tmp_path / "ckpt")
    bias = [n for n in on_disk if n.endswith("e_score_correction_bias")]
    assert len(bias) == 3 and {on_disk[n].dtype for n in bias} == {torch.float32}
    assert {t.dtype for n, t in on_disk.items() if n not in bias} == {torch.bfloat16}
    loaded = blank_model(cfg, torch.bfloat16)
    load_weights(loaded, tmp_path / "ckpt")
    want, got = model.state_dict(), loaded.state_dict()
    bad = [k for k in got if not same(got[k], want[k].to(got[k].dtype))]
    assert not bad, bad


def test_convert_bf16_fp8_bf16_fp8(tmp_path):
    cfg = tiny()
    save_pretrained(random_model(cfg), tmp_path / "bf16", cfg, max_shard_bytes=400_000)
    lines: list[str] = []
    convert_checkpoint(
        tmp_path / "bf16", tmp_path / "fp8", "fp8", max_shard_bytes=300_000, progress=lines.append
    )
    src, fp8 = read_dir(tmp_path / "bf16"), read_dir(tmp_path / "fp8")
    assert len(lines) == len(set(checkpoint_files(tmp_path / "fp8").values())) > 1
    quantizable = [n for n in src if QUANTIZABLE.match(n)]
    # 5 attention projections in each of 4 layers (MTP included), 1 dense MLP, 3 MoE layers (shared + routed)
    assert len(quantizable) == 4 * 5 + 3 + 3 * (3 + 3 * cfg.n_routed_experts)
    assert sorted(fp8) == sorted([*src, *(n + "_scale_inv" for n in quantizable)])
    for name, t in src.items():
        if name in quantizable:
            q, s = ops.quantize_per_block(t)
            assert same(fp8[name], q) and same(fp8[name + "_scale_inv"], s), name
        else:
            assert same(fp8[name], t), name
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"] == FP8_QUANTIZATION_CONFIG

    convert_checkpoint(tmp_path / "fp8", tmp_path / "bf16b", "bf16")
    back = read_dir(tmp_path / "bf16b")
    assert sorted(back) == sorted(src)
    for name in quantizable:
        assert same(
            back[name],
            ops.dequantize_per_block(fp8[name], fp8[name + "_scale_inv"], out_dtype=torch.bfloat16),
        )
    assert "quantization_config" not in json.loads((tmp_path / "bf16b" / "config.json").read_text())

    # Re-quantizing the dequantized BF16 gives the same codes and, because every block's amax is a BF16 value
    # (the original weights are BF16, and 448 * (amax / 448) rounds back to it), the same scales.
    convert_checkpoint(tmp_path / "bf16b", tmp_path / "fp8b", "fp8")
    again = read_dir(tmp_path / "fp8b")
    assert sorted(again) == sorted(fp8)
    bad = [n for n in fp8 if not same(again[n], fp8[n])]
    assert not bad, bad

    # An FP8 checkpoint converted to FP8 again passes through unchanged.
    convert_checkpoint(tmp_path / "fp8", tmp_path / "fp8c", "fp8")
    assert all(same(t, fp8[n]) for n, t in read_dir(tmp_path / "fp8c").items())


def test_cli_convert(tmp_path, capsys):
    cfg = tiny(fp8=True)
    save_pretrained(random_model(cfg), tmp_path / "fp8", cfg)
    (tmp_path / "fp8" / "tokenizer.json").write_text("{}")
    assert (
        cli_main(
            [
                "convert",
                "--to",
                "bf16",
                "--max-shard-gib",
                "0.0003",
                str(tmp_path / "fp8"),
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    shards = sorted(set(checkpoint_files(tmp_path / "out").values()))
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == len(shards) + 1 > 2
    assert all(line.startswith(f"{p.name}: ") for line, p in zip(out, shards, strict=False))
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"
    with pytest.raises(SystemExit):
        cli_main(["convert", "--to", "int4", str(tmp_path / "fp8"), str(tmp_path / "out")])
    with pytest.raises(ValueError, match="to must be"):
        convert_checkpoint(tmp_path / "fp8", tmp_path / "out", "int4")


def test_bf16_checkpoint_into_fp8_model_and_back(tmp_path):
    bf16_cfg, fp8_cfg = tiny(), tiny(fp8=True)
    bf16_model = random_model(bf16_cfg)
    save_pretrained(bf16_model, tmp_path / "bf16", bf16_cfg)
    fp8_model = blank_model(fp8_cfg)
    load_weights(fp8_model, tmp_path / "bf16")
    want, got = bf16_model.state_dict(), fp8_model.state_dict()
    for key, t in got.items():
        if key.endswith("_scale_inv"):
            continue
        if t.dtype == FP8:
            q, s = ops.quantize_per_block(want[key])
            assert same(t, q) and same(got[key + "_scale_inv"], s), key
        else:
            assert same(t, want[key]), key

    fp8_model = random_model(fp8_cfg)
    save_pretrained(fp8_model, tmp_path / "fp8", fp8_cfg)
    for dtype in (torch.bfloat16, torch.float32):
        dense = blank_model(bf16_cfg, dtype)
        load_weights(dense, tmp_path / "fp8")
        want = fp8_model.state_dict()
        for key, t in dense.state_dict().items():
            if want[key].dtype == FP8:
                expected = ops.dequantize_per_block(want[key], want[key + "_scale_inv"], out_dtype=dtype)
            else:
                expected = want[key].to(t.dtype)
            assert same(t, expected), key


@pytest.mark.parametrize("fp8", [False, True])
def test_rank_aware_loading_reads_only_held_experts(tmp_path, monkeypatch, fp8):
    cfg = tiny(fp8)
    full = random_model(cfg)
    save_pretrained(full, tmp_path / "ckpt", cfg, max_shard_bytes=300_000)
    reads = spy_reads(monkeypatch)
    part = blank_model(cfg, expert_ids=[2, 5])
    report = load_weights(part, tmp_path / "ckpt")
    read_experts = {hf_to_internal(n)[1] for n in reads} - {None}
    assert read_experts == {2, 5}
    moe_layers, others = 3, cfg.n_routed_experts - 2  # layers 1, 2 and the MTP layer 3
    assert len(report.skipped_experts) == moe_layers * others * 3
    assert not set(report.skipped_experts) & set(reads)
    want, got = full.state_dict(), part.state_dict()
    for key, t in got.items():
        expected = want[key][[2, 5]] if ".mlp.experts." in key else want[key]
        assert same(t, expected), key

    # A subset model saves its own experts under their global ids.
    save_pretrained(part, tmp_path / "part", cfg)
    names = read_dir(tmp_path / "part")
    assert {hf_to_internal(n)[1] for n in names} - {None} == {2, 5}


def test_missing_and_unexpected_keys(tmp_path):
    cfg = tiny()
    save_pretrained(random_model(cfg), tmp_path / "ckpt", cfg)
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    del tensors["model.norm.weight"], tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    tensors["model.extra.weight"] = torch.zeros(3)
    (tmp_path / "bad").mkdir()
    save_file(tensors, tmp_path / "bad" / "model.safetensors")
    with pytest.raises(
        KeyError, match=r"missing 2 keys.*model\.norm\.weight.*unexpected 1.*model\.extra\.weight"
    ):
        load_weights(blank_model(cfg), tmp_path / "bad")
    report = load_weights(blank_model(cfg), tmp_path / "bad", strict=False)
    assert sorted(report.missing) == ["model.layers.1.mlp.experts.5.up_proj.weight", "model.norm.weight"]
    assert report.unexpected == ["model.extra.weight"]

    # The MTP layer is ignored (and reported) for a model without one; a model with one needs it.
    no_mtp = blank_model(tiny(num_nextn_predict_layers=0))
    report = load_weights(no_mtp, tmp_path / "ckpt")
    assert report.ignored_mtp and all(n.startswith("model.layers.3.") for n in report.ignored_mtp)
    save_pretrained(no_mtp, tmp_path / "no_mtp", tiny(num_nextn_predict_layers=0))
    with pytest.raises(KeyError, match=r"missing 44 keys \['model\.layers\.3\.self_attn\.q_a_proj\.weight'"):
        load_weights(blank_model(cfg), tmp_path / "no_mtp")

    with pytest.raises(ValueError, match=r"lm_head\.weight has shape \(2048, 128\), the model \(1024, 128\)"):
        load_weights(blank_model(tiny(vocab_size=1024)), tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="no safetensors"):
        load_weights(blank_model(cfg), tmp_path)


def test_unindexed_shards_load(tmp_path):
    cfg = tiny()
    model = random_model(cfg)
    save_pretrained(model, tmp_path / "ckpt", cfg, max_shard_bytes=500_000)
    (tmp_path / "ckpt" / ckpt.INDEX_FILE).unlink()
    loaded = blank_model(cfg)
    load_weights(loaded, tmp_path / "ckpt")
    assert_same_state(model, loaded)


def test_save_is_atomic(tmp_path, monkeypatch):
    cfg = tiny()
    first = random_model(cfg)
    save_pretrained(first, tmp_path / "ckpt", cfg, max_shard_bytes=300_000)
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}

    real_save, calls = ckpt.save_file, []

    def crash_on_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", crash_on_second_shard)
    second = random_model(cfg)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(second, tmp_path / "ckpt", cfg, max_shard_bytes=300_000)
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directory left behind

    monkeypatch.setattr(ckpt, "save_file", real_save)
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text('{"model": {}}')
    (tokenizer / "tokenizer_config.json").write_text("{}")
    save_pretrained(second, tmp_path / "ckpt", cfg, tokenizer_dir=tokenizer)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "tok"]
    loaded = blank_model(cfg)
    load_weights(loaded, tmp_path / "ckpt")
    assert_same_state(second, loaded)


def test_transformers_interop(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = tiny(torch_dtype="float32")
    (tmp_path / "cfg").mkdir()
    cfg.save(tmp_path / "cfg" / "config.json")
    hf = transformers.DeepseekV3ForCausalLM(transformers.AutoConfig.from_pretrained(tmp_path / "cfg")).eval()
    with torch.no_grad():
        for t in hf.state_dict(keep_vars=True).values():
            t.copy_(torch.randn(t.shape))
    hf_state = {k: v.clone() for k, v in hf.state_dict().items()}
    hf.save_pretrained(tmp_path / "hf")

    model = blank_model(cfg, torch.float32)
    report = load_weights(model, tmp_path / "hf", strict=False)
    assert not report.unexpected
    assert report.missing and all(k.startswith("model.layers.3.") for k in report.missing)  # HF drops MTP
    got = model.state_dict()
    for name, t in hf_state.items():
        key, expert = hf_to_internal(name)
        assert same(got[key] if expert is None else got[key][expert], t), name

    save_pretrained(model, tmp_path / "dsv3", cfg)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dsv3", dtype=torch.float32)
    back_state = back.state_dict()
    assert back_state.keys() == hf_state.keys()
    bad = [k for k in hf_state if not same(back_state[k], hf_state[k])]
    assert not bad, bad
