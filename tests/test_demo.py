"""The demo: its choice of precision (by the CPU's flags, then by measuring; the probes mocked here) and its
held-out report."""

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


def test_the_demo_reports_the_base_and_the_fine_tuned_held_out_loss(tmp_path):
    from dialogtrain.demo import held_out_losses

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 0, "epoch": 0, "eval_loss": 2.5, "eval_ppl": 12.18}\n'
                       '{"step": 10, "epoch": 0, "loss": 1.9}\n'
                       '{"step": 24, "epoch": 0, "loss": 2.2, "eval_loss": 1.25, "eval_ppl": 3.49}\n')
    assert held_out_losses(metrics, 6) == ("held-out loss (assistant tokens of the 6 held-out conversations): "
                                           "base 2.500, fine-tuned 1.250 (step 24)")
