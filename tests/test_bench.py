"""`make bench`: the arithmetic of its figures (fast) and a whole --quick run on a tiny model (slow)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from bench.plan import QUICK, Plan
from bench.run import choose_precision
from bench.timing import charged_pairs_per_s, throughput
from tests.conftest import REPO

ROWS = ["SFT tokens/s", "SFT MFU", "DPO pairs/s, TRL default reference", "DPO pairs/s, precomputed reference",
        "model-state memory per rank", "peak memory per rank (", "peak memory per rank, memory settings",
        "`dialogtrain --help`", "`dialogtrain sft --dry-run`",
        "held-out assistant-token loss", "held-out reward accuracy"]


def test_throughput_drops_the_warm_up_steps_and_divides_sums():
    speed = throughput([10.0, 2.0, 4.0], [100, 200, 400], warmup=1)
    assert speed["per_s"] == pytest.approx(600 / 6) and speed["timed_steps"] == 2
    with pytest.raises(ValueError, match="warm-up"):
        throughput([1.0], [1], warmup=1)


def test_precomputation_is_charged_per_pair_it_covers():
    plan = Plan(**{**QUICK.__dict__, "micro_batch": 8})
    # 2 timed steps of 8 pairs at 4 pairs/s = 4 s; 40 pairs precomputed in 10 s = 0.25 s per pair -> +4 s
    result = {"timed_steps": 2, "pairs_per_s": 4.0, "precompute_s": 10.0, "precomputed_pairs": 40}
    assert charged_pairs_per_s(result, plan) == pytest.approx(16 / 8)
    assert charged_pairs_per_s({**result, "precompute_s": 0.0, "precomputed_pairs": 0}, plan) == pytest.approx(4.0)


def test_auto_precision_runs_bf16_only_where_it_is_not_slower():
    assert choose_precision("auto", {"fp32": 50e9, "bf16": 300e9})[0] == "bf16"
    assert choose_precision("auto", {"fp32": 50e9, "bf16": 1e9})[0] == "fp32"
    assert choose_precision("bf16", {"fp32": 50e9, "bf16": 1e9})[0] == "bf16"


def test_live_tensor_bytes_counts_each_storage_once():
    import torch

    from bench.memory_worker import live_tensor_bytes

    before = live_tensor_bytes()
    block = torch.zeros(1000, 1000)  # 4 MB
    views = [block[:10], block.view(-1), block.t()]  # no new storage
    other = torch.zeros(500, dtype=torch.float64)  # 4000 bytes
    assert live_tensor_bytes() - before == 4_000_000 + 4000
    weight = torch.nn.Parameter(torch.ones(250))  # 1000 bytes
    (weight * 2).sum().backward()  # a 1000-byte gradient that only autograd has touched
    assert live_tensor_bytes() - before == 4_000_000 + 4000 + 2000
    del block, views, other, weight
    assert live_tensor_bytes() == before


@pytest.mark.slow
def test_quick_bench_on_a_tiny_model_produces_every_row(llama_dir, tmp_path):
    """About 2-3 minutes on 2 cores: every training run of both sides, memory, start-up, table, JSON, PNG."""
    completed = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--model", str(llama_dir),
                                "--out", str(tmp_path), "--no-readme"], cwd=REPO, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    metrics = [row["metric"] for row in result["rows"]]
    for name in ROWS:
        assert any(metric.startswith(name) for metric in metrics), name
        assert any(line.startswith(f"| {name}") for line in completed.stdout.splitlines()), name
    r = result["results"]
    for figure in (r["ours_sft"]["tokens_per_s"], r["trl_sft"]["tokens_per_s"], r["ours_dpo"]["pairs_per_s"],
                   r["trl_dpo"]["pairs_per_s"], r["trl_dpo_pre"]["precompute_s"], r["ours_dpo_pre"]["precompute_s"],
                   r["mfu_ours"], r["memory_zero0"]["model_state_bytes"], r["memory_zero3"]["model_state_bytes"],
                   r["memory_zero0"]["peak_bytes"], r["memory_zero3"]["peak_bytes"],
                   r["memory_zero0_lean"]["peak_bytes"], r["memory_zero3_lean"]["peak_bytes"],
                   r["ours_sft"]["eval_loss"], r["trl_sft"]["eval_loss"]):
        assert math.isfinite(figure) and figure > 0
    png = (tmp_path / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
