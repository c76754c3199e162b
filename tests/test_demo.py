"""The demo's choice of precision: by the CPU's flags, then by measuring (the probes mocked here)."""

import pytest

import dialogtrain.hardware
import dialogtrain.train.mfu
from dialogtrain.demo import DEFAULT_STEPS, demo_precision


def never_probed(precision, device, budget_s=0.8):
    raise AssertionError("a CPU without native bf16 needs no measuring")


@pytest.mark.parametrize(("native", "peaks", "want"), [
    (False, None, "fp32"),
    (True, {"fp32": 301e9, "bf16": 150e9}, "fp32"),  # the AVX512-BF16 Xeon without AMX this was written on
    (True, {"fp32": 120e9, "bf16": 480e9}, "bf16"),  # AMX
])
def test_the_demo_runs_bf16_only_where_it_measures_at_least_as_fast_as_fp32(monkeypatch, native, peaks, want):
    monkeypatch.setattr(dialogtrain.hardware, "cpu_has_native_bf16", lambda flags=None: native)
    monkeypatch.setattr(dialogtrain.train.mfu, "matmul_peak_flops",
                        (lambda precision, device, budget_s=0.8: peaks[precision]) if peaks else never_probed)
    precision, why = demo_precision()
    assert precision == want and precision in DEFAULT_STEPS
    if peaks:
        assert f"{peaks['bf16'] / 1e9:.0f}" in why and f"{peaks['fp32'] / 1e9:.0f}" in why
