"""The command line and the package metadata: `dsv3 info`, `dsv3 bench gemm`, the README example."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

import dsv3
from dsv3 import ops

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "dsv3.cli", *args],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=600,
    ).stdout


def test_info_reports_build():
    out = _run("info")
    info = dsv3.build_info()
    assert f"dsv3          {dsv3.__version__}" in out
    assert torch.__version__ in out
    archs = ", ".join(info["cuda_archs"]) or "none (CPU-only build)"
    assert f"CUDA kernels  {archs}" in out
    expected_path = "AVX-512" if info["cpu_path"] == "avx512" else "portable"
    assert re.search(rf"CPU path\s+{expected_path}", out)


def test_cpu_path_env_override():
    env = dict(os.environ, DSV3_CPU_PATH="portable")
    out = _run("info", env=env)
    assert re.search(r"CPU path\s+portable", out)


def test_bench_gemm_writes_results(tmp_path):
    path = tmp_path / "gemm.json"
    _run("bench", "gemm", "--m", "1,3", "--shapes", "256x384", "--baselines", "bf16,deq", "--json", str(path))
    rows = json.loads(path.read_text())["rows"]
    assert [(r["m"], r["n"], r["k"]) for r in rows] == [(1, 256, 384), (3, 256, 384)]
    for r in rows:
        assert set(r["speedup"]) == {"bf16", "deq"}
        assert r["dsv3_gflops"] > 0 and all(v > 0 for v in r["speedup"].values())


def test_readme_example_runs():
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["y"].shape == (4, 32, 1024)
    assert scope["dw_e"].shape == (3, 2112, 7168)
    assert scope["o"].shape == (2, 1, 16, 512) and scope["lse"].shape == (2, 16, 1)
    assert ops.calc_diff(scope["o8"], scope["o"]) < 1e-3
