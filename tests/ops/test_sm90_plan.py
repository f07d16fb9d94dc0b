"""Host logic of the sm_90a FP8 GEMM kernels through torch.ops.dsv3.sm90_gemm_plan (no GPU needed): every
V3 shape gets a config that fits in shared memory, the choice and the wave counts match a brute-force
recomputation, the TMA parameters satisfy cuTensorMapEncodeTiled's rules, and the persistent scheduler visits
every tile exactly once in the rasterized order, and the bf16 tiles written by TMA store are the ones the
kernel may write whole (a masked GEMM's partial tiles use plain stores: rows past masked_m stay untouched)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import dsv3  # noqa: F401  (registers torch.ops.dsv3)
from dsv3.ops.reference import V3_GEMM_SHAPES

SMEM_CAPACITY = 232448
H800_SMS, H200_SMS = 132, 132


def plan(kind: str, m: int, n: int, k: int, groups: int = 1, sms: int = H800_SMS) -> dict:
    return json.loads(torch.ops.dsv3.sm90_gemm_plan(kind, m, n, k, groups, sms))


def expected_tiles(p: dict, kind: str, m: int, n: int, groups: int) -> int:
    tiles = math.ceil(m / p["block_m"]) * math.ceil(n / p["block_n"])
    return tiles * (groups if kind == "masked" else 1)


def check_config(p: dict, kind: str, m: int, n: int, k: int, groups: int, sms: int) -> None:
    assert p["ok"], p["reason"]
    bm, bn = p["block_m"], p["block_n"]
    assert (
        bm in (64, 128) and p["num_math_warpgroups"] == bm // 64 and p["num_threads"] == 128 * (bm // 64 + 1)
    )
    assert bn % 8 == 0 and 8 <= bn <= 256  # WGMMA m64nNk32: N a multiple of 8 up to 256
    assert 3 <= p["stages"] <= 8 and p["smem_bytes"] <= SMEM_CAPACITY <= p["smem_capacity"]
    assert p["block_k"] == 128 and p["num_k_blocks"] == math.ceil(k / 128)
    # 2-CTA clusters (A multicast) for dense GEMMs from 1024 rows with an even number of N blocks and an even
    # grid: the pairing of tiles this needs is checked by check_schedule.
    pairable = p["num_n_blocks"] % 2 == 0 and p["grid"] % 2 == 0
    assert p["cluster_size"] == (2 if kind == "dense" and m >= 1024 and pairable else 1)
    # A B tile straddles at most two 128-row scale blocks, wherever it starts.
    assert all(n0 % 128 + bn <= 256 for n0 in range(0, n, bn))
    # Waves and utilization, recomputed.
    tiles = expected_tiles(p, kind, m, n, groups)
    assert p["num_tiles"] == tiles and p["grid"] == min(tiles, sms)
    assert p["num_waves"] == math.ceil(tiles / sms)
    assert p["last_wave_util"] == pytest.approx((tiles - (p["num_waves"] - 1) * sms) / sms, abs=1e-5)

    # The choice minimizes waves x (bm + 32) x (bn + 32) over shapes with >= 3 stages; ties: the larger tile.
    def cost(shape):
        sm, sn, _ = shape
        t = math.ceil(m / sm) * math.ceil(n / sn) * (groups if kind == "masked" else 1)
        return math.ceil(t / sms) * (sm + 32) * (sn + 32), -sm * sn

    fitting = [s for s in p["tile_shapes"] if s[2] >= 3]
    assert min(fitting, key=cost)[:2] == [bm, bn]
    assert [bm, bn, p["stages"]] in p["tile_shapes"]


def check_smem(p: dict, wgrad: bool) -> None:
    bm, bn, st, off = p["block_m"], p["block_n"], p["stages"], p["smem_offsets"]
    assert off["a"] == 0 and off["b"] == st * bm * 128 and off["b"] % 1024 == 0 and (bn * 128) % 1024 == 0
    assert off["sa"] == off["b"] + st * bn * 128 and off["sb"] == off["sa"] + st * bm * 4
    assert off["full_bar"] >= off["sb"] + (st * bn * 4 if wgrad else 0) and off["full_bar"] % 8 == 0
    assert off["empty_bar"] == off["full_bar"] + 8 * st and off["sb_blocks"] >= off["empty_bar"] + 8 * st
    assert off["staging"] >= off["sb_blocks"] + (0 if wgrad else 8 * p["num_k_blocks"])
    assert off["staging"] % 128 == 0  # a TMA store source
    staging = 0 if wgrad else bm * 2 * bn  # dense bf16 rows: the TMA store box, no swizzle
    assert p["smem_bytes"] == off["staging"] + staging + 1024  # + slack to align the base to 1024
    assert p["stage_bytes"] == bm * 128 + bn * 128 + bm * 4 + (bn * 4 if wgrad else 0)


def check_tma(p: dict) -> None:
    for name, t in p["tma"].items():
        assert t["problem"] == "", (name, t["problem"])
        assert all(s % 16 == 0 for s in t["strides_bytes"]), name
        assert all(1 <= b <= 256 for b in t["box"]) and all(d >= 1 for d in t["dims"]), name
        assert (t["box"][0] * t["elem_bytes"]) % 16 == 0, name
    a, b = p["tma"]["a"], p["tma"]["b"]
    for t, rows in ((a, p["block_m"]), (b, p["block_n"])):
        assert t["elem_bytes"] == 1 and t["swizzle_bytes"] == 128 and t["box"] == [128, rows, 1]
    sa = p["tma"]["sa"]
    assert sa["elem_bytes"] == 4 and sa["swizzle_bytes"] == 0 and sa["box"] == [p["block_m"], 1, 1]
    assert sa["strides_bytes"][0] >= 4 * sa["dims"][0]  # MN-major: rows contiguous, padded to 4
    if "d" in p["tma"]:  # the bf16 output's TMA store: one staged tile, unswizzled
        d = p["tma"]["d"]
        assert (
            d["elem_bytes"] == 2 and d["swizzle_bytes"] == 0 and d["box"] == [p["block_n"], p["block_m"], 1]
        )
        assert d["strides_bytes"][0] == 2 * d["dims"][0]
    else:
        assert "sb" in p["tma"]  # wgrad: fp32 output from registers


def check_tma_store_tiles(p: dict, kind: str, m: int) -> None:
    """Every bf16 tile but a masked GEMM's partial ones (the last M block of a group when block_m does not
    divide its rows) is written by one TMA store."""
    tiles = [tile for cta in p["tiles_per_cta"] for tile in cta]
    if kind == "wgrad":
        want = 0
    elif kind == "masked":
        want = sum(m - mb * p["block_m"] >= p["block_m"] for _, mb, _ in tiles)
    else:
        want = len(tiles)
    assert p["tma_store_tiles"] == want


def raster_order(num_m: int, num_n: int, band: int) -> list[tuple[int, int]]:
    """The rasterized tile order: bands of `band` N blocks, M-major inside a band."""
    order = []
    for first_n in range(0, num_n, band):
        width = min(band, num_n - first_n)
        order += [(mb, first_n + i) for mb in range(num_m) for i in range(width)]
    return order


def check_schedule(p: dict, kind: str, m: int, n: int, groups: int) -> None:
    per_cta, grid = p["tiles_per_cta"], p["grid"]
    assert len(per_cta) == grid
    num_m, num_n = math.ceil(m / p["block_m"]), math.ceil(n / p["block_n"])
    order = raster_order(num_m, num_n, p["raster_group_n"])
    groups_walked = groups if kind == "masked" else 1
    want = [(g, mb, nb) for g in range(groups_walked) for mb, nb in order]
    got: dict[int, tuple[int, int, int]] = {}
    for cta, tiles in enumerate(per_cta):
        for i, tile in enumerate(tiles):
            got[cta + i * grid] = tuple(tile)  # CTA c runs tiles c, c + grid, c + 2 grid, ...
    assert [got[t] for t in range(len(got))] == want  # every tile exactly once, in the rasterized order
    check_tma_store_tiles(p, kind, m)
    if p["cluster_size"] == 2:  # CTAs 2c and 2c + 1 run tiles of one M block, adjacent in N, in lockstep
        for first, second in zip(per_cta[0::2], per_cta[1::2], strict=True):
            assert len(first) == len(second)
            for (g0, m0, n0), (g1, m1, n1) in zip(first, second, strict=True):
                assert (g0, m0, n1) == (g1, m1, n0 + 1)


@pytest.mark.parametrize("m", [1, 64, 128, 4096])
@pytest.mark.parametrize(("n", "k"), V3_GEMM_SHAPES)
def test_dense_v3_shapes(m, n, k):
    p = plan("dense", m, n, k)
    check_config(p, "dense", m, n, k, 1, H800_SMS)
    check_smem(p, wgrad=False)
    check_tma(p)
    if "tiles_per_cta" in p:
        check_schedule(p, "dense", m, n, 1)


@pytest.mark.parametrize(("groups", "m_per_group"), [(4, 8192), (8, 4096), (2, 128)])
@pytest.mark.parametrize(("n", "k"), [(4096, 7168), (7168, 2048), (2112, 7168)])
def test_contiguous(groups, m_per_group, n, k):
    m = groups * m_per_group
    p = plan("contiguous", m, n, k, groups)
    check_config(p, "contiguous", m, n, k, groups, H800_SMS)
    check_tma(p)
    assert p["tma"]["b"]["dims"] == [k, n, groups] and p["tma"]["b"]["strides_bytes"] == [k, n * k]
    assert p["tma"]["a"]["dims"][2] == 1


@pytest.mark.parametrize(
    ("groups", "expected_m"), [(1, 1024), (2, 512), (4, 256), (32, 20), (6, 1), (3, 200)]
)
@pytest.mark.parametrize(("n", "k"), [(4096, 7168), (7168, 2048)])
def test_masked(groups, expected_m, n, k):
    p = plan("masked", expected_m, n, k, groups)
    check_config(p, "masked", expected_m, n, k, groups, H800_SMS)
    check_smem(p, wgrad=False)
    check_tma(p)
    a = p["tma"]["a"]
    assert a["dims"] == [k, expected_m, groups] and a["strides_bytes"] == [k, expected_m * k]
    assert p["tma"]["sa"]["dims"] == [expected_m, math.ceil(k / 128), groups]
    d = p["tma"]["d"]
    assert d["dims"] == [n, expected_m, groups] and d["strides_bytes"] == [2 * n, 2 * expected_m * n]
    if "tiles_per_cta" in p:
        check_schedule(p, "masked", expected_m, n, groups)


@pytest.mark.parametrize("k", [4096, 8192, 1040])  # 1040: a K tail (TMA zero-fills it)
@pytest.mark.parametrize(("m", "n"), [(2112, 7168), (576, 7168), (7168, 2048), (4096, 7168), (7168, 16384)])
def test_wgrad(m, n, k):
    p = plan("wgrad", m, n, k)
    check_config(p, "wgrad", m, n, k, 1, H800_SMS)
    check_smem(p, wgrad=True)
    check_tma(p)
    sb = p["tma"]["sb"]
    assert sb["elem_bytes"] == 4 and sb["box"] == [p["block_n"], 1, 1] and sb["dims"][0] == n


@pytest.mark.parametrize("sms", [1, 7, 78, 114, 132])
def test_schedule_any_grid(sms):
    for kind, m, n, groups in (
        ("dense", 1000, 3000, 1),
        ("masked", 300, 1000, 5),
        ("contiguous", 640, 560, 3),
    ):
        p = plan(kind, m, n, 512, groups, sms)
        check_config(p, kind, m, n, 512, groups, sms)
        check_schedule(p, kind, m, n, groups)


def test_masked_partial_tiles_use_plain_stores():
    # 200 rows per group: the last M block of every group is partial (200 % 64 and 200 % 128 != 0), and a TMA
    # store would write all of its rows inside the [groups, 200, n] tensor, so only full blocks use one.
    p = plan("masked", 200, 1024, 512, 3)
    bm, nb = p["block_m"], p["num_n_blocks"]
    assert p["num_tiles"] == 3 * math.ceil(200 / bm) * nb and 200 % bm != 0
    assert p["tma_store_tiles"] == 3 * (200 // bm) * nb
    # Dense and contiguous: the tensor's edge is the tile's edge (TMA clips the box), every tile uses it.
    for kind in ("dense", "contiguous"):
        q = plan(kind, 200, 1024, 512, 3)
        assert q["tma_store_tiles"] == q["num_tiles"]


@pytest.mark.parametrize("sms", [132, 131, 78])
def test_cluster_choice(sms):
    for m, n, want in ((4096, 7168, 2), (1024, 4096, 2), (1023, 4096, 1), (2048, 2112, None)):
        p = plan("dense", m, n, 2048, 1, sms)
        check_config(p, "dense", m, n, 2048, 1, sms)
        check_schedule(p, "dense", m, n, 1)
        if want is not None and p["grid"] % 2 == 0 and p["num_n_blocks"] % 2 == 0:
            assert p["cluster_size"] == want
    for kind in ("contiguous", "masked", "wgrad"):  # their tiles cannot be paired in lockstep
        assert plan(kind, 4096, 7168, 2048, 4, sms)["cluster_size"] == 1


def test_small_m_prefers_small_n_tiles():
    # Memory-bound decode shapes: enough tiles to occupy every SM (DeepGEMM's unaligned-N motivation).
    p = plan("dense", 1, 2112, 7168)
    assert (p["block_m"], p["num_tiles"]) == (64, 132)
    assert plan("dense", 4096, 7168, 16384)["block_n"] == 160  # the non-power-of-two-ish wide tile pays here


def test_k_too_large_and_empty_problems():
    p = plan("dense", 128, 128, 128 * 200_000)
    assert not p["ok"] and "shared memory" in p["reason"]
    for args in ((0, 128, 128), (128, 0, 128), (128, 128, 0)):
        p = plan("dense", *args)
        assert not p["ok"] and "empty" in p["reason"]


def test_unknown_kind_raises():
    with pytest.raises((ValueError, RuntimeError), match="kind must be"):
        plan("sparse", 1, 1, 1)
