"""bf16 is fast on a CPU only with AMX or AVX512-BF16; the launcher says so when it is not."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dialogtrain import hardware


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 amx_bf16 fma\n\nprocessor\t: 1\n")
    assert hardware.cpu_flags(cpuinfo) == {"fpu", "avx2", "amx_bf16", "fma"}
    assert hardware.cpu_flags(tmp_path / "missing") == set()


@pytest.mark.parametrize("flags, native", [({"avx2", "fma"}, False), ({"avx512_bf16"}, True),
                                           ({"amx_bf16", "amx_tile"}, True), (set(), False)])
def test_native_bf16_needs_amx_or_avx512_bf16(flags, native):
    assert hardware.cpu_has_native_bf16(flags) is native


def test_the_launcher_notes_slow_bf16_on_this_cpu(tmp_path):
    done = subprocess.run([sys.executable, "-m", "launcher.cli", "sft", "--model", "m", "--data", "d", "--output",
                           str(tmp_path / "run"), "--gpus", "cpu", "--precision", "bf16", "--dry-run"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (f"note: {hardware.SLOW_BF16_NOTE}" in done.stderr) is (not hardware.cpu_has_native_bf16())


def test_measuring_the_matmul_peak_leaves_the_global_rng_alone():
    """The peak is measured at worker start for a time-dependent number of sizes: drawing from the global
    RNG would make dropout, and so an exact resume, depend on how busy the machine was."""
    import torch

    from dialogtrain.train.mfu import matmul_peak_flops

    torch.manual_seed(1)
    expected = torch.rand(4)
    torch.manual_seed(1)
    assert matmul_peak_flops("fp32", "cpu", budget_s=0.1) > 0
    assert torch.equal(torch.rand(4), expected)
