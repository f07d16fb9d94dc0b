"""tools/sass_audit.py: its cuobjdump parsing and rule checks on canned output (runs anywhere), the CLI end to
end with a stand-in cuobjdump, and the real audit of the built library when dsv3 has CUDA kernels."""

from __future__ import annotations

import importlib.util
import json
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch

import dsv3

TOOL = Path(__file__).resolve().parents[1] / "tools" / "sass_audit.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("sass_audit", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


audit = _load_tool()

QUANT = (
    "_ZN4dsv34cuda12_GLOBAL__N_128quantize_token_groups_kernel"
    "I13__nv_bfloat16Li8EEEvPKT_PhPfNS1_15TokenGroupShapeEb"
)
DEQUANT = "_ZN4dsv34cuda12_GLOBAL__N_124dequantize_blocks_kernelIfLi4EEEvPKhPKfPT_NS1_10BlockShapeE"
MYSTERY = "_Z14mystery_kernelPf"
NAMES = {
    QUANT: "void dsv3::cuda::(anonymous namespace)::quantize_token_groups_kernel<__nv_bfloat16, 8>("
    "__nv_bfloat16 const*, unsigned char*, float*, dsv3::cuda::(anonymous namespace)::TokenGroupShape, bool)",
    DEQUANT: "void dsv3::cuda::(anonymous namespace)::dequantize_blocks_kernel<float, 4>("
    "unsigned char const*, float const*, float*, dsv3::cuda::(anonymous namespace)::BlockShape)",
    MYSTERY: "mystery_kernel(float*)",
}


def _ins(addr: int, text: str, pred: str = "") -> str:
    """One instruction line as cuobjdump prints it, with its second encoding line."""
    return (
        f"        /*{addr:04x}*/  {pred:>18} {text} ;{' ' * 20}/* 0x00000a00ff017b82 */\n"
        f"{' ' * 97}/* 0x000ff00000000800 */\n"
    )


ELF_HEADER = "\nFatbin elf code:\n================\narch = sm_90a\ncode version = [1,8]\nhost = linux\n"
HEADER = ELF_HEADER + "compile_size = 64bit\n\n\tcode for sm_90a\n\t.target\tsm_90a\n\n"
SASS = (
    HEADER
    + f"\t\tFunction : {QUANT}\n"
    + '\t.headerflags\t@"EF_CUDA_ACCELERATORS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"\n'
    + _ins(0x00, "LDC R1, c[0x0][0x28]")
    + _ins(0x10, "LDG.E.128.CONSTANT R12, desc[UR10][R12.64]", "@P0")
    + _ins(0x20, "SHFL.BFLY PT, R29, R38, 0x2, 0x1f")
    + _ins(0x30, "F2FP.SATFINITE.E4M3.F32.PACK_AB_MERGE_C R5, R6, R7, RZ")
    + _ins(0x40, "STG.E.64 desc[UR10][R2.64], R4")
    + _ins(0x50, "EXIT", "@!P0")
    + "\t\t..........\n\n\n"
    + f"\t\tFunction : {DEQUANT}\n"
    + _ins(0x00, "LDG.E.CONSTANT R4, desc[UR8][R2.64]")
    + _ins(0x10, "F2FP.F16.E4M3.UNPACK_B R6, R4")
    + _ins(0x20, "STL [R1+0x18], R4")
    + _ins(0x30, "LDL R17, [R1+0x18]")
    + _ins(0x40, "STG.E desc[UR8][R8.64], R6")
    + _ins(0x50, "EXIT")
    + f"\t\tFunction : {MYSTERY}\n"
    + _ins(0x00, "EXIT")
)


def _res(name: str, fields: str) -> str:
    return f" Function {name}:\n  {fields} CONSTANT[0]:624 TEXTURE:0 SURFACE:0 SAMPLER:0\n"


RES_USAGE = (
    ELF_HEADER
    + "compile_size = 64bit\n\nResource usage:\n Common:\n  GLOBAL:0\n"
    + _res(QUANT, "REG:64 STACK:0 SHARED:0 LOCAL:0")
    + _res(DEQUANT, "REG:96 STACK:8 SHARED:1056 LOCAL:8")
    + _res(MYSTERY, "REG:8 STACK:0 SHARED:0 LOCAL:0")
)


def test_parse_sass_splits_kernels_and_strips_predicates():
    kernels = audit.parse_sass(SASS)
    assert [k.mangled for k in kernels] == [QUANT, DEQUANT, MYSTERY]
    assert {k.arch for k in kernels} == {"sm_90a"}
    quant = kernels[0]
    assert len(quant.instructions) == 6
    assert quant.instructions[1] == "LDG.E.128.CONSTANT R12, desc[UR10][R12.64]"
    assert quant.instructions[-1] == "EXIT"


def test_parse_res_usage_pairs_with_kernels():
    usage = audit.parse_res_usage(RES_USAGE)
    assert [(arch, name) for arch, name, _ in usage] == [
        ("sm_90a", QUANT),
        ("sm_90a", DEQUANT),
        ("sm_90a", MYSTERY),
    ]
    assert usage[1][2] == {
        **{"REG": 96, "STACK": 8, "SHARED": 1056, "LOCAL": 8},
        **{"CONSTANT[0]": 624, "TEXTURE": 0, "SURFACE": 0, "SAMPLER": 0},
    }
    kernels = audit.parse_sass(SASS)
    audit.attach_resources(kernels, usage)
    assert [k.resources["REG"] for k in kernels] == [64, 96, 8]


def test_short_name():
    assert audit.short_name(NAMES[QUANT]) == "dsv3::cuda::quantize_token_groups_kernel<__nv_bfloat16, 8>"
    assert audit.short_name(NAMES[MYSTERY]) == "mystery_kernel"
    assert audit.short_name("void f<(int)3>(int)") == "f<(int)3>"


def test_rules_pass_fail_and_unmatched():
    verdicts = {v.kernel.mangled: v for v in audit.audit(SASS, RES_USAGE, audit.RULES, NAMES)}
    quant, dequant, mystery = verdicts[QUANT], verdicts[DEQUANT], verdicts[MYSTERY]

    assert quant.ok and quant.rule.name.startswith("fp8 quantize, per-token")
    assert not quant.missing and not quant.forbidden and not quant.limits

    assert not dequant.ok and dequant.rule.name == "fp8 dequantize, 16-byte stores"
    assert dequant.missing == [audit.STORE_16B]
    assert dequant.forbidden == {r"^LDL\b": 1, r"^STL\b": 1}
    assert dequant.limits == ["REG 96 > 80", "STACK 8 > 0", "LOCAL 8 > 0"]

    assert mystery.rule is None and not mystery.ok


def test_quantize_rule_does_not_swallow_dequantize():
    kernel = audit.Kernel("sm_90a", "x", name="dsv3::cuda::dequantize_token_groups_kernel<float, 4>")
    assert audit.match_rule(kernel, audit.RULES).name == "fp8 dequantize, 16-byte stores"
    kernel.arch = "sm_100a"
    assert audit.match_rule(kernel, audit.RULES) is None


def test_missing_resource_usage_fails():
    verdicts = audit.audit(SASS, "", audit.RULES, NAMES)
    assert all("no -res-usage entry" in v.limits for v in verdicts if v.rule)


def test_table_lists_every_kernel():
    table = audit.format_table(audit.audit(SASS, RES_USAGE, audit.RULES, NAMES))
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["kernel", "arch", "regs"] and len(lines) == 2 + 3
    assert "PASS" in lines[2] and "no rule" in lines[4] and "FAIL" in lines[3]


@pytest.fixture
def fake_cuobjdump(tmp_path, monkeypatch):
    """A cuobjdump stand-in printing the canned listings, and a library file for it to 'read'."""
    (tmp_path / "sass.txt").write_text(SASS)
    (tmp_path / "res.txt").write_text(RES_USAGE)
    tool = tmp_path / "cuobjdump"
    tool.write_text(
        f'#!/bin/sh\nif [ "$1" = "-sass" ]; then cat {tmp_path}/sass.txt; else cat {tmp_path}/res.txt; fi\n'
    )
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CUOBJDUMP", str(tool))
    library = tmp_path / "_C.so"
    library.write_bytes(b"\x7fELF")
    return library


@pytest.mark.skipif(shutil.which("c++filt") is None, reason="needs c++filt (binutils)")
def test_cli_end_to_end(fake_cuobjdump, tmp_path, capsys):
    report = tmp_path / "audit.json"
    assert audit.main([str(fake_cuobjdump), "--json", str(report)]) == 1
    out = capsys.readouterr()
    assert "dsv3::cuda::quantize_token_groups_kernel<__nv_bfloat16, 8>" in out.out
    assert "mystery_kernel: matches no rule" in out.err
    data = json.loads(report.read_text())
    assert (data["kernels"], data["failed"]) == (3, 2)
    assert [r["ok"] for r in data["results"]] == [True, False, False]


def test_cli_exit_2_without_cuda_code(tmp_path, monkeypatch, capsys):
    tool = tmp_path / "cuobjdump"
    tool.write_text(
        "#!/bin/sh\necho \"cuobjdump info    : File '$2' does not contain device code\"\nexit 255\n"
    )
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CUOBJDUMP", str(tool))
    library = tmp_path / "_C.so"
    library.write_bytes(b"\x7fELF")
    assert audit.main([str(library)]) == 2
    assert "contains no CUDA code" in capsys.readouterr().err
    assert audit.main([str(tmp_path / "missing.so")]) == 2


def _cuda_built() -> bool:
    return bool(json.loads(torch.ops.dsv3.build_info())["cuda_archs"])


@pytest.mark.skipif(not _cuda_built(), reason="dsv3 was built without CUDA kernels")
def test_real_library_passes_the_audit(capsys):
    if audit.find_cuobjdump() is None:
        pytest.skip("cuobjdump not found (CUOBJDUMP, PATH, CUDA_HOME or the triton wheel)")
    if shutil.which("c++filt") is None:
        pytest.skip("needs c++filt (binutils)")
    library = Path(dsv3._C.__file__)
    status = audit.main([str(library)])
    assert status == 0, capsys.readouterr().out
