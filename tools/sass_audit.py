"""SASS audit of dsv3's CUDA kernels (SPEC §8): disassemble the built library with cuobjdump and check
every kernel against RULES: the instructions it must contain (the fp8 conversions, WGMMA, TMA, ...), the
ones it must not (local memory: LDL/STL), and its registers/stack/local memory from `cuobjdump -res-usage`.
Every kernel must match a rule, so a new kernel fails the audit until it gets one.

    python tools/sass_audit.py [path/to/_C*.so ...] [--json FILE]

Exit status: 0 every kernel passes; 1 a kernel fails or matches no rule; 2 nothing to audit (no CUDA code
in the library, or cuobjdump / c++filt missing). Pure standard library: runs without importing torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# ---- rules: first match wins (order specific -> general). `kernel` is searched in the demangled name
# with "(anonymous namespace)::", the return type and the parameter list removed, e.g.
# "dsv3::cuda::quantize_token_groups_kernel<__nv_bfloat16, 8>". `require`/`forbid` are searched in each
# instruction ("OPCODE operands", predicate removed).

LOCAL_MEMORY = (r"^LDL\b", r"^STL\b")  # spills and stack arrays live in local memory

E4M3_PACK = r"^F2FP\.SATFINITE\.E4M3\.F32\.PACK_AB"  # cvt.rn.satfinite.e4m3x2.f32: two fp32 -> e4m3
E4M3_UNPACK = r"^F2FP\.F16\.E4M3\.UNPACK_B"  # cvt.rn.f16x2.e4m3x2: two e4m3 -> f16 (exact)
WIDE_TYPES_16B = r"<(float, 4|__nv_bfloat16, 8|__half, 8)>"  # the 16-byte vector instantiations
LOAD_16B, STORE_16B = r"^LDG\.E\.128", r"^STG\.E\.128"
WARP_REDUCE, CTA_BARRIER = r"^SHFL\.BFLY", r"^BAR\.SYNC"
# __launch_bounds__(256, 3) in csrc/cuda/quant.cu: three CTAs of 256 threads per SM, <= 80 registers.
QUANT_MAX_REGISTERS = 80
# sm_90a FP8 GEMMs (csrc/cuda/fp8_gemm.cu): FP8 WGMMA, TMA loads, setmaxnreg (producer down, math up); the
# bf16-output kernels also store their tiles with TMA (cp.async.bulk.tensor.3d.global.shared::cta) and, on
# 2-CTA clusters, multicast A (.multicast::cluster) and synchronize the cluster (barrier.cluster).
FP8_WGMMA, TMA_LOAD, SETMAXNREG = r"^QGMMA\.64x\d+x32\.F32\.E4M3\.E4M3", r"^UTMALDG\.3D", r"^USETMAXREG"
TMA_STORE, TMA_MULTICAST, CLUSTER_BARRIER = r"^UTMASTG\.3D", r"^UTMALDG\.3D\.MULTICAST", r"^UCGABAR_WAIT"
# Registers ptxas reports (nvcc 13.0, -O3): 168 for every block_m = 128 kernel (384 threads: the 65536 / 384
# cap, no spills, with 2 x block_n / 2 fp32 accumulators), 232 (setmaxnreg's math budget) for block_m = 64.
GEMM_TWO_MATH_WG_MAX_REGISTERS, GEMM_ONE_MATH_WG_MAX_REGISTERS = 168, 232
# sm_90a MLA decode (csrc/cuda/mla_decode.cu): bf16/fp16 WGMMA (HGMMA; nvcc 13.0 spells the fp16 form with
# no type suffix, the bf16 one with .BF16), Q.K^T on 64x32 tiles and P.V on 64x256 with V read transposed
# (tnspB); the FP8-KV kernel also unpacks e4m3 to f16 before the bf16 rounding. __launch_bounds__(256, 1):
# 255 registers at most (ptxas uses 230..238, no spills).
HGMMA_QK = r"^HGMMA\.64x32x16\.F32(\.BF16)? "
HGMMA_PV = r"^HGMMA\.64x256x16\.F32(\.BF16)? .*tnspB"
HGMMA_BF16 = r"^HGMMA\.64x\d+x16\.F32\.BF16 "
MLA_DECODE_MAX_REGISTERS = 255
# MoE router (csrc/cuda/moe_route.cu): one warp per token, scores in registers; butterfly shuffles for the
# group top-2 and the (value, index) arg-max rounds, an indexed shuffle for the winner's score, a warp vote
# for non-finite rows. ptxas (nvcc 13.0): 32..193 registers from 1 to 32 values per lane, no spills.
WARP_BROADCAST, WARP_VOTE = r"^SHFL\.IDX", r"^VOTE\.ANY"
ROUTE_MAX_REGISTERS = 200
# Low-latency EP kernels on NVSHMEM (csrc/cuda/ep_nvshmem/ll_kernels.cu, in dsv3._C_nvshmem): row copies with
# 16-byte accesses, warp-reduced counts (REDUX.SUM of __reduce_add_sync), no spills. The send kernels call
# NVSHMEM's transport entry points (put + signal, p), real ABI calls whose frames are their only stack;
# ptxas (nvcc 13.0, NVSHMEM 3.4.5): 54..112 registers, 368 bytes of call stack, no local memory.
WARP_SUM = r"^REDUX\.SUM"
# A call passes its stack arguments at the stack pointer ("STL [R1], Rn" right before CALL): not a spill.
LOCAL_MEMORY_BUT_CALL_ARGS = (r"^LDL\b", r"^STL(\.\d+)? (?!\[R1\], )")
LL_MAX_REGISTERS, LL_CALL_STACK = 128, 512
# Internode EP kernels on NVSHMEM (csrc/cuda/ep_nvshmem/internode.cu, in dsv3._C_nvshmem): queue flags,
# heads and barrier words are 64-bit system-scope acquire loads (LDG.E.64.STRONG.SYS); rows move as 16-byte
# loads and stores; NVSHMEM's P2P puts and signal adds are inlined (system-scope 64-bit atomics), its remote
# transport entry points are calls whose frames are the only stack (the same call-argument STL as the
# low-latency kernels). A timed-out wait calls `fail` (flag store, trap). __launch_bounds__(512, 1) caps
# dispatch/combine at 128 registers; ptxas (nvcc 13.0, NVSHMEM 3.4.5): 70 (dispatch), 88 (combine), <= 72
# otherwise.
SYS_ACQUIRE_64, BF16_PACK = r"^LDG\.E\.64\.STRONG\.SYS", r"^F2FP\.BF16\.F32\.PACK_AB"
SYS_STORE = r"^ST(G)?\.E\.STRONG\.SYS"
EP_INTERNODE_MAX_REGISTERS, EP_INTERNODE_CALL_STACK = 128, 512
# EP dispatch layout (csrc/cuda/ep_layout.cu): per-thread counts in shared memory summed after CTA barriers,
# outputs written once, so no global reductions (RED). ptxas (nvcc 13.0): 40 registers, no spills.
GLOBAL_REDUCTION = r"^RED\."
EP_LAYOUT_MAX_REGISTERS = 64
# Intranode EP kernels over CUDA IPC (csrc/cuda/ep_intranode.cu): queue flags are system-scope acquire loads
# (LDG.E.STRONG.SYS, then CCTL.IVALL) and release stores (MEMBAR.ALL.SYS, then STG.E.STRONG.SYS), barrier
# arrivals system-scope reductions; rows move as 16-byte loads (read-only inputs .CONSTANT, peer-written queue
# slots L2-only .STRONG.GPU) and 16-byte stores; a timed-out wait traps (BPT.TRAP). __launch_bounds__(768, 1)
# caps dispatch/combine at 80 registers; ptxas (nvcc 13.0): 60 (dispatch), 66..80 (combine), <= 32 otherwise.
SYS_ACQUIRE, SYS_RELEASE, SYS_FENCE = r"^LDG\.E\.STRONG\.SYS", r"^STG\.E\.STRONG\.SYS", r"^MEMBAR\.ALL\.SYS"
SYS_REDUCTION, TRAP = r"^REDG\.E\.ADD\.S32\.STRONG\.SYS", r"^BPT\.TRAP"
LOAD_16B_NC, LOAD_16B_L2 = r"^LDG\.E\.128\.CONSTANT", r"^LDG\.E\.128\.STRONG\.GPU"
EP_NVL_MAX_REGISTERS, EP_NVL_SYNC_MAX_REGISTERS = 80, 64


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str
    kernel: str  # regex searched in the kernel's short name
    require: tuple[str, ...] = ()  # each must match at least one instruction
    forbid: tuple[str, ...] = LOCAL_MEMORY  # none may match any instruction
    max_registers: int | None = None
    max_stack: int = 0  # bytes, from -res-usage STACK
    max_local: int = 0  # bytes, from -res-usage LOCAL
    arch: str = r"^sm_90a$"  # regex on the cubin's arch; a kernel built for another arch needs its own rule


RULES: list[Rule] = [
    Rule(
        "fp8 quantize, per-token groups, 16-byte loads",
        r"::quantize_token_groups_kernel" + WIDE_TYPES_16B,
        require=(E4M3_PACK, LOAD_16B, WARP_REDUCE),
        max_registers=QUANT_MAX_REGISTERS,
    ),
    Rule(
        "fp8 quantize, per-block, 16-byte loads",
        r"::quantize_blocks_kernel" + WIDE_TYPES_16B,
        require=(E4M3_PACK, LOAD_16B, WARP_REDUCE, CTA_BARRIER),
        max_registers=QUANT_MAX_REGISTERS,
    ),
    Rule(
        "fp8 quantize, single-element fallback (unaligned k or pointers)",
        r"::quantize_(token_groups|blocks)_kernel<\w+, 1>",
        require=(E4M3_PACK,),
        max_registers=QUANT_MAX_REGISTERS,
    ),
    Rule(
        "fp8 dequantize, 16-byte stores",
        r"::dequantize_(token_groups|blocks)_kernel" + WIDE_TYPES_16B,
        require=(E4M3_UNPACK, STORE_16B),
        max_registers=QUANT_MAX_REGISTERS,
    ),
    Rule(
        "fp8 dequantize, single-element fallback",
        r"::dequantize_(token_groups|blocks)_kernel<\w+, 1>",
        require=(E4M3_UNPACK,),
        max_registers=QUANT_MAX_REGISTERS,
    ),
    Rule(
        "fp8 gemm (dense/grouped), block_m 128: two math warpgroups, TMA store, cluster multicast",
        r"::fp8_gemm_kernel<128, \d+, false>",
        require=(FP8_WGMMA, TMA_LOAD, SETMAXNREG, TMA_STORE, TMA_MULTICAST, CLUSTER_BARRIER),
        max_registers=GEMM_TWO_MATH_WG_MAX_REGISTERS,
    ),
    Rule(
        "fp8 gemm (wgrad), block_m 128: two math warpgroups, fp32 out from registers",
        r"::fp8_gemm_kernel<128, \d+, true>",
        require=(FP8_WGMMA, TMA_LOAD, SETMAXNREG),
        forbid=(*LOCAL_MEMORY, TMA_STORE, TMA_MULTICAST),
        max_registers=GEMM_TWO_MATH_WG_MAX_REGISTERS,
    ),
    Rule(
        "fp8 gemm (dense/grouped), block_m 64: one math warpgroup, TMA store, cluster multicast",
        r"::fp8_gemm_kernel<64, \d+, false>",
        require=(FP8_WGMMA, TMA_LOAD, SETMAXNREG, TMA_STORE, TMA_MULTICAST, CLUSTER_BARRIER),
        max_registers=GEMM_ONE_MATH_WG_MAX_REGISTERS,
    ),
    Rule(
        "mla decode, FP8 KV cache: e4m3 pages dequantized to bf16 in shared memory, bf16 WGMMA",
        r"::mla_decode_kernel<__nv_bfloat16, true>",
        require=(HGMMA_QK, HGMMA_PV, HGMMA_BF16, E4M3_UNPACK, CTA_BARRIER),
        max_registers=MLA_DECODE_MAX_REGISTERS,
    ),
    Rule(
        "mla decode, bf16 KV cache: bf16 WGMMA, no fp8 conversion",
        r"::mla_decode_kernel<__nv_bfloat16, false>",
        require=(HGMMA_QK, HGMMA_PV, HGMMA_BF16, CTA_BARRIER),
        forbid=(*LOCAL_MEMORY, E4M3_UNPACK),
        max_registers=MLA_DECODE_MAX_REGISTERS,
    ),
    Rule(
        "mla decode, fp16 KV cache: fp16 WGMMA (no bf16 variant)",
        r"::mla_decode_kernel<__half, false>",
        require=(HGMMA_QK, HGMMA_PV, CTA_BARRIER),
        forbid=(*LOCAL_MEMORY, HGMMA_BF16, E4M3_UNPACK),
        max_registers=MLA_DECODE_MAX_REGISTERS,
    ),
    Rule("mla decode: combine of split partials", r"::mla_combine_kernel<(__nv_bfloat16|__half)>"),
    Rule("mla decode: split-KV schedule (one thread)", r"::mla_metadata_kernel$"),
    Rule(
        "moe router: one warp per token, warp-shuffle top-2 and arg-max",
        r"::moe_route_kernel<\d+>",
        require=(WARP_REDUCE, WARP_BROADCAST, WARP_VOTE),
        max_registers=ROUTE_MAX_REGISTERS,
    ),
    Rule(
        "ep low-latency dispatch send, fp8: 1x128 cast (half-warp amax, e4m3 pack), NVSHMEM put + signal",
        r"::ll::ll_dispatch_send_kernel<true>",
        require=(E4M3_PACK, LOAD_16B, WARP_REDUCE, WARP_SUM),
        forbid=LOCAL_MEMORY_BUT_CALL_ARGS,
        max_registers=LL_MAX_REGISTERS,
        max_stack=LL_CALL_STACK,
    ),
    Rule(
        "ep low-latency dispatch send, bf16: 16-byte row staging, NVSHMEM put + signal",
        r"::ll::ll_dispatch_send_kernel<false>",
        require=(LOAD_16B, STORE_16B, WARP_SUM),
        forbid=(*LOCAL_MEMORY_BUT_CALL_ARGS, E4M3_PACK),
        max_registers=LL_MAX_REGISTERS,
        max_stack=LL_CALL_STACK,
    ),
    Rule(
        "ep low-latency dispatch recv: bounded waits, rows packed per (expert, source) with 16-byte copies",
        r"::ll::ll_dispatch_recv_kernel<(true|false)>",
        require=(LOAD_16B, STORE_16B, CTA_BARRIER),
        max_registers=LL_MAX_REGISTERS,
    ),
    Rule(
        "ep low-latency combine send: 16-byte row staging, NVSHMEM put + signal",
        r"::ll::ll_combine_send_kernel$",
        require=(LOAD_16B, STORE_16B),
        forbid=LOCAL_MEMORY_BUT_CALL_ARGS,
        max_registers=LL_MAX_REGISTERS,
        max_stack=LL_CALL_STACK,
    ),
    Rule(
        "ep low-latency combine recv: fp32 weighted sum in k order, one bf16 cast, 16-byte rows",
        r"::ll::ll_combine_recv_kernel$",
        require=(LOAD_16B, STORE_16B, WARP_SUM),
        max_registers=LL_MAX_REGISTERS,
    ),
    # Relocatable device code (dsv3._C_nvshmem) keeps callees as functions of their own: NVSHMEM's transport
    # entry points (its code, not audited for content) and nvcc's division slow path.
    Rule(
        "ep intranode dispatch: IPC queues, sys-scope acquire/release flags, 16-byte row copies",
        r"::dispatch_kernel<[248]>$",
        require=(SYS_ACQUIRE, SYS_RELEASE, SYS_FENCE, LOAD_16B_NC, LOAD_16B_L2, STORE_16B, CTA_BARRIER, TRAP),
        max_registers=EP_NVL_MAX_REGISTERS,
    ),
    Rule(
        "ep intranode combine: IPC queues, sys-scope flags, fp32 sums of 16-byte bf16 rows",
        r"::combine_kernel<[248]>$",
        require=(SYS_ACQUIRE, SYS_RELEASE, SYS_FENCE, LOAD_16B_NC, LOAD_16B_L2, STORE_16B, CTA_BARRIER, TRAP),
        max_registers=EP_NVL_MAX_REGISTERS,
    ),
    Rule(
        "ep intranode notify / queue reset / barrier: sys-scope arrivals and flags",
        r"::(notify_dispatch|reset_queues|barrier)_kernel<[248]>$",
        require=(SYS_REDUCTION, SYS_ACQUIRE, SYS_RELEASE, SYS_FENCE, CTA_BARRIER, TRAP),
        max_registers=EP_NVL_SYNC_MAX_REGISTERS,
    ),
    Rule(
        "ep internode dispatch: RDMA send / forward / NVLink receive queues, acquire-loaded flags, 16-B rows",
        r"::internode::internode_dispatch_kernel$",
        require=(SYS_ACQUIRE_64, LOAD_16B, STORE_16B, CTA_BARRIER, WARP_VOTE),
        forbid=LOCAL_MEMORY_BUT_CALL_ARGS,
        max_registers=EP_INTERNODE_MAX_REGISTERS,
        max_stack=EP_INTERNODE_CALL_STACK,
    ),
    Rule(
        "ep internode combine: fp32 sums of 16-byte bf16 rows, one bf16 cast per hop, acquire-loaded flags",
        r"::internode::internode_combine_kernel$",
        require=(SYS_ACQUIRE_64, LOAD_16B, STORE_16B, BF16_PACK, CTA_BARRIER),
        forbid=LOCAL_MEMORY_BUT_CALL_ARGS,
        max_registers=EP_INTERNODE_MAX_REGISTERS,
        max_stack=EP_INTERNODE_CALL_STACK,
    ),
    Rule(
        "ep internode notify / sync: barrier rounds and count records, system-scope acquire loads",
        r"::internode::internode_(notify|sync)_kernel$",
        require=(SYS_ACQUIRE_64, CTA_BARRIER),
        forbid=LOCAL_MEMORY_BUT_CALL_ARGS,
        max_registers=EP_NVL_SYNC_MAX_REGISTERS,
        max_stack=EP_INTERNODE_CALL_STACK,
    ),
    Rule(
        "ep internode channel prefix: warp-reduced channel counts, serial prefix",
        r"::internode::internode_channel_prefix_kernel$",
        require=(WARP_SUM, CTA_BARRIER),
        max_registers=EP_LAYOUT_MAX_REGISTERS * 2,
    ),
    Rule(
        "ep internode: timeout report (system-scope flag store, trap)",
        r"::internode::fail$",
        require=(SYS_STORE, TRAP),
    ),
    Rule("NVSHMEM device library: transport entry points", r"^nvshmemi_transfer_\w+<", forbid=()),
    Rule("nvcc runtime: fp32 division slow path", r"^__cuda_sm3x_div_rn_noftz_f32_slowpath$"),
    Rule(
        "ep dispatch layout: shared-memory per-thread counts, one write per output",
        r"::ep_dispatch_layout_kernel<(int|long)>",
        require=(CTA_BARRIER,),
        forbid=(*LOCAL_MEMORY, GLOBAL_REDUCTION),
        max_registers=EP_LAYOUT_MAX_REGISTERS,
    ),
    # The combine's sums must be plain fp32 adds in the CPU kernel's order: an FFMA would mean the compiler
    # contracted something and the bits could differ from the CPU's.
    Rule(
        "ep combine reduction (fp32 adds, rank order)",
        r"::ep_combine_reduce_kernel<(float|__half|__nv_bfloat16)>",
        require=(r"^FADD",),
        forbid=(*LOCAL_MEMORY, r"^FFMA"),
        max_registers=EP_LAYOUT_MAX_REGISTERS,
    ),
]

# ---- locating the tools and the library


class AuditError(Exception):
    """Nothing to audit: exit status 2."""


def find_cuobjdump() -> str | None:
    """$CUOBJDUMP, then PATH, then $CUDA_HOME/bin, then the copy shipped in the triton wheel."""
    candidates = [os.environ.get("CUOBJDUMP"), shutil.which("cuobjdump")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(str(Path(os.environ["CUDA_HOME"]) / "bin" / "cuobjdump"))
    spec = importlib.util.find_spec("triton")  # locates the package without importing it
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidates.append(str(Path(location) / "backends" / "nvidia" / "bin" / "cuobjdump"))
    return next((c for c in candidates if c and os.access(c, os.X_OK) and Path(c).is_file()), None)


def find_libraries() -> list[Path]:
    """Every dsv3/_C*.so (dsv3._C, and dsv3._C_nvshmem when built) of the importable dsv3 package, found
    without importing dsv3 (and so torch)."""
    spec = importlib.util.find_spec("dsv3")
    if spec is None or not spec.submodule_search_locations:
        raise AuditError("dsv3 is not importable here; pass the library path (e.g. build/.../_C*.so)")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("_C*.so"))
        if found:
            return found
    raise AuditError(
        f"no _C*.so next to dsv3 in {list(spec.submodule_search_locations)}; pass the library path"
    )


def run_tool(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)


def disassemble(cuobjdump: str, library: Path) -> tuple[str, str]:
    """(`cuobjdump -sass` text, `cuobjdump -res-usage` text) of the library."""
    outputs = []
    for flag in ("-sass", "-res-usage"):
        proc = run_tool([cuobjdump, flag, str(library)])
        text = proc.stdout + proc.stderr
        if "does not contain device code" in text:
            raise AuditError(f"{library} contains no CUDA code (was dsv3 built with DSV3_CUDA=on?)")
        if proc.returncode != 0:
            raise AuditError(f"{cuobjdump} {flag} {library} failed ({proc.returncode}): {text.strip()[:500]}")
        outputs.append(proc.stdout)
    return outputs[0], outputs[1]


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> demangled, through c++filt ($CXXFILT or PATH), one call for all names."""
    tool = os.environ.get("CXXFILT") or shutil.which("c++filt")
    if tool is None:
        raise AuditError("c++filt not found (binutils); set CXXFILT to a demangler that reads names on stdin")
    proc = run_tool([tool], stdin="\n".join(names) + "\n")
    lines = proc.stdout.splitlines()
    if proc.returncode != 0 or len(lines) != len(names):
        raise AuditError(f"{tool} failed to demangle {len(names)} names: {proc.stderr.strip()[:300]}")
    return dict(zip(names, lines, strict=True))


def short_name(demangled: str) -> str:
    """'void ns::(anonymous namespace)::k<T, 8>(T const*, int)' -> 'ns::k<T, 8>'."""
    name = demangled.replace("(anonymous namespace)::", "")
    depth = 0
    for i, ch in enumerate(name):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            name = name[:i]
            break
    return re.sub(r"^void\s+", "", name).strip()


# ---- parsing cuobjdump output


@dataclasses.dataclass
class Kernel:
    arch: str
    mangled: str
    instructions: list[str] = dataclasses.field(default_factory=list)
    resources: dict[str, int] = dataclasses.field(default_factory=dict)
    name: str = ""  # short demangled name (short_name); the mangled name until demangled


_ARCH_RE = re.compile(r"^\s*arch = (\S+)")
_FUNCTION_RE = re.compile(r"^\s*Function : (\S+)")
# "        /*0040*/  @!P0 LDG.E.128 R4, desc[UR4][R2.64] ;   /* 0x... */" -> "LDG.E.128 R4, desc[UR4][R2.64]"
_INSTRUCTION_RE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*[^;]*?)\s*;")
_RES_FUNCTION_RE = re.compile(r"^\s*Function (\S+):\s*$")
_RES_FIELD_RE = re.compile(r"([A-Z]+(?:\[\d+\])?):(\d+)")


def parse_sass(text: str) -> list[Kernel]:
    """Split `cuobjdump -sass` output into kernels, in order (one entry per cubin the kernel is in)."""
    kernels: list[Kernel] = []
    arch = "unknown"
    for line in text.splitlines():
        if m := _ARCH_RE.match(line):
            arch = m.group(1)
        elif m := _FUNCTION_RE.match(line):
            kernels.append(Kernel(arch=arch, mangled=m.group(1), name=m.group(1)))
        elif kernels and (m := _INSTRUCTION_RE.match(line)):
            kernels[-1].instructions.append(re.sub(r"\s+", " ", m.group(1)))
    return kernels


def parse_res_usage(text: str) -> list[tuple[str, str, dict[str, int]]]:
    """(arch, mangled name, {"REG": .., "STACK": .., "SHARED": .., "LOCAL": .., ...}) in output order."""
    entries: list[tuple[str, str, dict[str, int]]] = []
    arch, function = "unknown", None
    for line in text.splitlines():
        if m := _ARCH_RE.match(line):
            arch = m.group(1)
        elif m := _RES_FUNCTION_RE.match(line):
            function = m.group(1)
        elif function is not None and (fields := _RES_FIELD_RE.findall(line)):
            entries.append((arch, function, {key: int(value) for key, value in fields}))
            function = None
    return entries


def attach_resources(kernels: list[Kernel], usage: list[tuple[str, str, dict[str, int]]]) -> None:
    """Pair kernels with their -res-usage entries (both listings keep cubin order, so the n-th occurrence
    of (arch, name) in one is the n-th in the other)."""
    pending: dict[tuple[str, str], list[dict[str, int]]] = {}
    for arch, name, fields in usage:
        pending.setdefault((arch, name), []).append(fields)
    for kernel in kernels:
        queue = pending.get((kernel.arch, kernel.mangled))
        if queue:
            kernel.resources = queue.pop(0)


# ---- checking


@dataclasses.dataclass
class Verdict:
    kernel: Kernel
    rule: Rule | None
    missing: list[str]  # required patterns with no matching instruction
    forbidden: dict[str, int]  # forbidden pattern -> number of matching instructions
    limits: list[str]  # resource limits exceeded, e.g. "REG 96 > 80"

    @property
    def ok(self) -> bool:
        return self.rule is not None and not self.missing and not self.forbidden and not self.limits

    def as_dict(self) -> dict[str, object]:
        return {
            "kernel": self.kernel.name,
            "mangled": self.kernel.mangled,
            "arch": self.kernel.arch,
            "rule": self.rule.name if self.rule else None,
            "registers": self.kernel.resources.get("REG"),
            "shared_bytes": self.kernel.resources.get("SHARED"),
            "stack_bytes": self.kernel.resources.get("STACK"),
            "local_bytes": self.kernel.resources.get("LOCAL"),
            "instructions": len(self.kernel.instructions),
            "missing_required": self.missing,
            "forbidden_found": self.forbidden,
            "limits_exceeded": self.limits,
            "ok": self.ok,
        }


def match_rule(kernel: Kernel, rules: list[Rule]) -> Rule | None:
    return next(
        (r for r in rules if re.search(r.arch, kernel.arch) and re.search(r.kernel, kernel.name)), None
    )


def check(kernel: Kernel, rules: list[Rule]) -> Verdict:
    rule = match_rule(kernel, rules)
    if rule is None:
        return Verdict(kernel, None, [], {}, [])
    missing = [p for p in rule.require if not any(re.search(p, ins) for ins in kernel.instructions)]
    forbidden = {
        p: n for p in rule.forbid if (n := sum(bool(re.search(p, ins)) for ins in kernel.instructions))
    }
    limits = []
    if not kernel.resources:
        limits.append("no -res-usage entry")
    else:
        for key, limit in (("REG", rule.max_registers), ("STACK", rule.max_stack), ("LOCAL", rule.max_local)):
            value = kernel.resources.get(key)
            if limit is not None and value is not None and value > limit:
                limits.append(f"{key} {value} > {limit}")
    return Verdict(kernel, rule, missing, forbidden, limits)


def audit(sass: str, res_usage: str, rules: list[Rule], names: dict[str, str] | None = None) -> list[Verdict]:
    """Parse both listings and check every kernel. `names` maps mangled -> demangled (identity if absent)."""
    kernels = parse_sass(sass)
    attach_resources(kernels, parse_res_usage(res_usage))
    for kernel in kernels:
        kernel.name = short_name((names or {}).get(kernel.mangled, kernel.mangled))
    return [check(kernel, rules) for kernel in kernels]


# ---- report


def format_table(verdicts: list[Verdict]) -> str:
    def cell(v: object) -> str:
        return "-" if v is None else str(v)

    header = ("kernel", "arch", "regs", "smem", "stack", "required", "forbidden", "verdict")
    rows = []
    for v in verdicts:
        res = v.kernel.resources
        required = (
            "no rule" if v.rule is None else ("missing " + ", ".join(v.missing) if v.missing else "all")
        )
        forbidden = ", ".join(f"{p} x{n}" for p, n in v.forbidden.items()) or "none"
        verdict = "PASS" if v.ok else "FAIL" + (f" ({'; '.join(v.limits)})" if v.limits else "")
        rows.append(
            (
                v.kernel.name,
                v.kernel.arch,
                cell(res.get("REG")),
                cell(res.get("SHARED")),
                cell(res.get("STACK")),
                required,
                forbidden,
                verdict,
            )
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def audit_library(cuobjdump: str, library: Path) -> list[Verdict]:
    if not library.is_file():
        raise AuditError(f"{library} does not exist")
    sass, res_usage = disassemble(cuobjdump, library)
    mangled = sorted({k.mangled for k in parse_sass(sass)})
    if not mangled:
        raise AuditError(f"{library} has no SASS kernels (PTX only, or no CUDA code)")
    return audit(sass, res_usage, RULES, demangle(mangled))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "libraries", nargs="*", type=Path, help="dsv3 extensions to audit (default: every dsv3/_C*.so)"
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    try:
        libraries = args.libraries or find_libraries()
        cuobjdump = find_cuobjdump()
        if cuobjdump is None:
            raise AuditError("cuobjdump not found: set CUOBJDUMP, put it on PATH, or install triton")
        per_library = [(library, audit_library(cuobjdump, library)) for library in libraries]
    except AuditError as err:
        print(f"sass_audit: {err}", file=sys.stderr)
        return 2
    for library, verdicts in per_library:
        print(f"{library} ({cuobjdump})")
        print(format_table(verdicts))
    verdicts = [v for _, lib_verdicts in per_library for v in lib_verdicts]
    failed = [v for v in verdicts if not v.ok]
    if args.json:
        results = [
            {"library": str(library), **v.as_dict()}
            for library, lib_verdicts in per_library
            for v in lib_verdicts
        ]
        summary = {
            "libraries": [str(lib) for lib in libraries],
            "kernels": len(verdicts),
            "failed": len(failed),
        }
        args.json.write_text(json.dumps({**summary, "results": results}, indent=2) + "\n")
    print(f"{len(verdicts) - len(failed)}/{len(verdicts)} kernels pass")
    for v in failed:
        if v.rule is None:
            print(
                f"  {v.kernel.name}: matches no rule; add one to RULES in tools/sass_audit.py",
                file=sys.stderr,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
