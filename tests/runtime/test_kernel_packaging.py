"""The kernel sources ship inside the wheel and are found from an installed copy, not only the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_installed_wheel_finds_and_compiles_its_kernels(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "maturin", "build", "--release", "-o", str(dist)], cwd=ROOT, check=True,
                   capture_output=True)
    wheel = next(dist.glob("moeflow-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for source in ("common.cuh", "dequant.cu", "expert_ffn.cu", "grouped_ffn.cu"):
        assert f"moeflow/_kernels/{source}" in names
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    probe = (
        "import moeflow, moeflow.runtime.kernels as k\n"
        "print(moeflow.__file__)\n"
        "print(k.kernel_dir())\n"
        "r = k.compile_source('dequant.cu', 'sm_80')\n"
        "print(r.ok or 'no-nvrtc' in r.log)\n"
        "print(len(k.signature('expert_ffn.cu', 'expert_ffn_decode_int4_bf16')))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, check=True, capture_output=True,
                         text=True).stdout.splitlines()
    assert out[0].startswith(str(site)), "the installed copy, not the checkout, was imported"
    assert out[1] == str(site / "moeflow" / "_kernels")
    assert out[2] == "True"
    assert out[3] == "13", "the launch signatures are read from the installed sources"
