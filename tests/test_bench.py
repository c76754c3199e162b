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
        "held-out assistant-token loss", "held-out reward accuracy", "ORPO pairs/s vs TRL", "SimPO pairs/s vs our",
        "KTO rated completions/s", "held-out desirable-above-undesirable share",
        "held-out reward accuracy (margin) after", "held-out reward accuracy (margin), same DPO run in `--precision pure",
        "SFT tokens/s, `--precision bf16` (mixed) vs `pure-bf16`", "model-state memory per rank, ZeRO-3 x2: bf16",
        "SFT tokens/s vs TRL packed", "peak host RSS per rank, ZeRO-3 x2: whole load -> partitioned load"]


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
    """About 20-30 minutes on 2 cores: every group's training runs of both sides, memory, start-up, table, JSON,
    PNG."""
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


# ----------------------------------------------------------------------------------------------------
# the precision, trl_packed and host_memory groups, and bench/gpu_check.py's parts that run on a CPU


def test_trl_packed_steps_hold_as_many_conversations_as_trls_packed_rows():
    from bench.trl_packed import conversations_per_step, packed_rows

    # TRL's own best-fit decreasing into rows of 4: [5 -> 4 (truncated)], [3, 1], [2] -> 3 rows
    assert packed_rows([5, 2, 3, 1], 4) == 3
    assert packed_rows([2, 2, 2, 2], 4) == 2 and packed_rows([3, 3, 3], 4) == 3
    assert conversations_per_step(834, 190, 8) == 35  # round(8 x 834 / 190) = round(35.1)
    assert conversations_per_step(4, 3, 8) == 11  # round(10.67)
    assert conversations_per_step(3, 300, 8) == 1  # never an empty step


def trl_packed_result(ours_per_s: float, trl_per_s: float) -> dict:
    side = {"step_tokens": [9999, 1900, 2100]}  # the first step is a warm-up step (QUICK.warmup = 1)
    return {"trl_packed": {"rows_per_step": 8, "max_length": 256, "conversations_per_step": 35,
                           "ours": {**side, "tokens_per_s": ours_per_s}, "trl": {**side, "tokens_per_s": trl_per_s}}}


def test_trl_packed_row_gives_both_sides_tokens_per_timed_step_and_the_ratio():
    from bench.trl_packed import rows

    (line,) = rows(trl_packed_result(250.0, 92.0), QUICK)
    assert "8 rows of 256" in line["metric"] and "35 conversations a step" in line["metric"]
    assert "tokens per timed step 2000 vs TRL 2000" in line["metric"]
    assert (line["ours"], line["peer"], line["ratio"], line["met"]) == ("250", "92", "2.72x", True)
    assert rows(trl_packed_result(180.0, 92.0), QUICK)[0]["met"] is False  # 1.96x


def precision_result(ours_accuracy: float) -> dict:
    dpo = {"eval_reward_accuracy": ours_accuracy, "eval_reward_margin": 0.1255}
    memory = {"model_state_bytes": 2 * 2**30}
    return {"precision": {
        "ours_dpo_bf16": dpo, "ours_dpo_pure-bf16": {"eval_reward_accuracy": 0.4375, "eval_reward_margin": 0.0039},
        "ours_dpo_fp32": {**dpo, "eval_reward_accuracy": 0.78125}, "trl_dpo_bf16": {
            "eval_reward_accuracy": 0.8125, "eval_reward_margin": 0.1}, "ours_sft_bf16": {"tokens_per_s": 200.0},
        "ours_sft_pure-bf16": {"tokens_per_s": 250.0}, "memory_zero0_bf16": memory, "memory_zero0_pure-bf16": memory,
        "memory_zero3_bf16": {"model_state_bytes": 1.5 * 2**30}, "memory_zero3_pure-bf16": {"model_state_bytes": 2**30}}}


def test_precision_rows_hold_ours_to_trl_within_one_held_out_pair():
    from bench.precision import ZERO3_GATHER, rows

    plan = Plan(**{**QUICK.__dict__, "dpo_held_out": 32, "dpo_steps": 8})
    table = rows(precision_result(0.78125), plan)  # 25 of 32 against TRL's 26: one pair fewer, met
    assert [line["met"] for line in table] == [True, None, None, None, None, None]
    assert table[0]["ours"] == "0.781 (margin 0.1255)" and table[0]["peer"] == "0.812 (margin 0.1000)"
    assert table[0]["ratio"] == "-0.031" and "after 8 DPO steps at lr 5e-06" in table[0]["metric"]
    assert table[1]["ours"] == "0.438 (margin 0.0039)" and "pure-bf16" in table[1]["metric"]
    assert table[3]["ratio"] == "0.80x"  # 200 / 250 tokens/s
    assert (table[4]["ratio"], table[5]["ratio"]) == ("1.00x", "1.50x")  # 2 GiB vs 2 GiB; 1.5 GiB vs 1 GiB
    assert ZERO3_GATHER in table[5]["metric"] and ZERO3_GATHER not in table[4]["metric"]
    assert rows(precision_result(0.75), plan)[0]["met"] is False  # 24 of 32: two pairs fewer


def test_zero3_under_torch_autocast_gathers_linear_weights_in_bf16_and_the_rest_in_fp32(monkeypatch):
    """What bench.precision's ZERO3_GATHER says, checked against the installed DeepSpeed."""
    import inspect
    import types

    import torch
    from deepspeed.runtime import torch_autocast
    from deepspeed.runtime.base_optimizer import ZeROOptimizer
    from deepspeed.runtime.zero.partition_parameters import AllGatherHandle, get_allgather_dtype

    for name in ("TORCH_AUTOCAST_INITIALIZED", "TORCH_AUTOCAST_DTYPE"):  # module globals, restored afterwards
        monkeypatch.setattr(torch_autocast, name, getattr(torch_autocast, name))
    embedding, linear, norm = torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5, bias=False), torch.nn.LayerNorm(4)
    linear.weight = embedding.weight  # tied, as SmolLM2's LM head
    mlp, untied = torch.nn.Linear(4, 4), torch.nn.Embedding(5, 4)
    engine = types.SimpleNamespace(module=torch.nn.ModuleList([embedding, linear, norm, mlp, untied]),
                                   zero_quantized_weights=lambda: False)
    torch_autocast.init_autocast_params(engine, torch.bfloat16, None)  # what deepspeed.initialize does
    gathered = {name: get_allgather_dtype(p, p.data) for name, p in (
        ("tied", embedding.weight), ("norm", norm.weight), ("mlp", mlp.weight), ("mlp bias", mlp.bias),
        ("untied", untied.weight))}
    assert gathered == {"tied": torch.bfloat16, "norm": torch.float32, "mlp": torch.bfloat16,
                        "mlp bias": torch.bfloat16, "untied": torch.float32}
    assert "original_dtype" in inspect.getsource(AllGatherHandle.wait)  # cast back to the fp32 it came from
    fp32_comm = types.SimpleNamespace(communication_data_type=torch.float32)  # ZeRO 1-3's gradient reduction
    assert ZeROOptimizer.get_param_comm_dtype(fp32_comm, mlp.weight) == torch.bfloat16
    assert ZeROOptimizer.get_param_comm_dtype(fp32_comm, norm.weight) == torch.float32


def test_host_memory_row_compares_peak_rss_of_whole_and_partitioned_loading():
    from bench.host_memory import rows

    def run(peak_mib: int, load_mib: int) -> dict:
        return {"peak_bytes": peak_mib * 2**20, "load_peak_bytes": load_mib * 2**20}

    (line,) = rows({"host_memory": {"whole": run(2000, 600), "partitioned": run(1500, 300)}}, QUICK)
    assert (line["ours"], line["ratio"], line["met"]) == ("2000 MiB -> 1500 MiB (600 -> 300)", "0.75x", True)
    assert rows({"host_memory": {"whole": run(1000, 600), "partitioned": run(1000, 300)}}, QUICK)[0]["met"] is False


def test_gpu_check_reads_pytest_summaries():
    from bench.gpu_check import pytest_counts

    assert pytest_counts("....\n===== 3 passed, 1 skipped, 2 deselected in 4.20s =====\n") == {
        "passed": 3, "skipped": 1}
    assert pytest_counts("F.E\n1 failed, 1 passed, 1 error in 3.1s\n") == {"failed": 1, "passed": 1, "errors": 1}
    assert pytest_counts("no tests ran in 0.01s") == {}


def test_gpu_check_counts_the_reads_a_gpu_would_sync_on():
    import torch

    from bench.gpu_check import count_ops

    x = torch.arange(6.0)
    ops, reads = count_ops(lambda: (float(x.sum()), x[x > 2], x.nonzero()))
    assert reads == 2  # float() reads the sum; nonzero; (a boolean index is not in READS)
    assert ops >= 5


def test_gpu_check_attention_paths_on_the_cpu_give_the_same_loss(llama_dir, monkeypatch):
    """The attention part of `make gpu-check` on the CPU (--device cpu): each path forced in turn computes
    the same loss; dialogtrain's paths read nothing back, transformers' sdpa reads once a forward (it
    looks for restarting positions); per example runs more ops than the one masked call."""
    import bench.gpu_check as gpu_check
    from dialogtrain.train import attention

    monkeypatch.setattr(gpu_check, "STEP_REPEATS", 1)
    result = gpu_check.measure_attention(str(llama_dir), "cpu", "bf16", 256)
    paths = result["paths"]
    assert list(paths) == [attention.BLOCK_MASK, attention.PER_EXAMPLE, gpu_check.SDPA_RESTARTING]
    assert result["chosen"] == attention.PER_EXAMPLE and result["layers"] == 2
    assert [p["syncs_per_step"] for p in paths.values()] == [0, 0, 1]
    assert paths[attention.PER_EXAMPLE]["launches_per_layer"] > paths[attention.BLOCK_MASK]["launches_per_layer"]
    losses = [p["loss"] for p in paths.values()]
    assert max(losses) - min(losses) < 0.02 * losses[0], losses
    table = gpu_check.attention_rows(result, cuda=False)
    assert [line["met"] for line in table] == [None, True]  # the chosen path: 0 value reads


def test_gpu_check_reads_the_gpu_off_nvidia_smi(monkeypatch, capsys):
    import bench.gpu_check as gpu_check

    def shell(argv, timeout=None, env=None):
        if argv[0] == "nvidia-smi" and "--format=csv,noheader" in argv:
            return 0, "NVIDIA H200, 143771 MiB, 580.159.04, 9.0\n"
        return 0, f"output of {argv[-1]}"

    monkeypatch.setattr(gpu_check, "shell", shell)
    assert gpu_check.report_machine() == {"name": "NVIDIA H200", "memory": "143771 MiB", "driver": "580.159.04",
                                          "capability": "9.0"}
    assert capsys.readouterr().out == "output of nvidia-smi\noutput of deepspeed.env_report\n"
    monkeypatch.setattr(gpu_check, "shell", lambda argv, timeout=None, env=None: (127, "nvidia-smi: not found"))
    assert gpu_check.report_machine() == {}
