"""`dialogtrain plan`: parameter counts from a config on the meta device, DeepSpeed's estimator formulas
written out by hand for the tiny GPT-2, and the recommendation."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from dialogtrain.plan import GiB, ParameterCounts, count_parameters, estimate_memory, format_bytes, recommend
from launcher.cli import cli
from launcher.devices import FAKE_GPUS_ENV


def gpt2_counts(config: dict) -> tuple[int, int]:
    """(total, largest layer) of a GPT-2 by hand: tied embeddings counted once, the token embedding
    (V x E, shared with the LM head) the largest module."""
    V, P, E, L = config["vocab_size"], config["n_positions"], config["n_embd"], config["n_layer"]
    block = (2 * E                # ln_1
             + E * 3 * E + 3 * E  # attn.c_attn
             + E * E + E          # attn.c_proj
             + 2 * E              # ln_2
             + E * 4 * E + 4 * E  # mlp.c_fc
             + 4 * E * E + E)     # mlp.c_proj
    return V * E + P * E + L * block + 2 * E, V * E


@pytest.fixture(scope="module")
def counts(gpt2_dir) -> ParameterCounts:
    return count_parameters(str(gpt2_dir))


def test_parameters_are_counted_from_the_config(counts, gpt2_dir):
    total, largest = gpt2_counts(json.loads((gpt2_dir / "config.json").read_text()))
    assert (counts.total, counts.largest_layer) == (total, largest) == (42368, 12800)


def test_estimates_follow_deepspeeds_formulas(counts):
    """stage_1_and_2.estimate_zero2_model_states_mem_needs and stage3.estimate_zero3_model_states_mem_needs
    (zero_init=False), 2 GPUs on 1 node, buffer factor 1.5; ZeRO-0 and ZeRO-1 in the same accounting."""
    P, L, N, per_node = counts.total, counts.largest_layer, 2, 2
    expected = {
        "--zero 0": (2 * P + 18 * P, P * 4 * per_node * 1.5),
        "--zero 1": (4 * P + int(16 * P / N), P * 4 * per_node * 1.5),
        "--zero 1 --offload optimizer": (2 * P + 2 * P, P * max(4 * N, 16) * 1.5),
        "--zero 2": (2 * P + int(18 * P / N), P * 4 * per_node * 1.5),
        "--zero 2 --offload optimizer": (2 * P, P * max(4 * N, 16) * 1.5),
        "--zero 3": (4 * L + int(18 * P / N), P * 4 * per_node * 1.5),
        "--zero 3 --offload optimizer": (4 * L + int(2 * P / N), P * max(4 * per_node, 16) * 1.5),
        "--zero 3 --offload optimizer+param": (4 * L, P * max(4 * per_node, 18) * 1.5),
    }
    got = {e.flags: (e.gpu_bytes, e.cpu_bytes) for e in estimate_memory(counts, gpus_per_node=2, nnodes=1)}
    assert got == {flags: (gpu, int(cpu)) for flags, (gpu, cpu) in expected.items()}
    assert got["--zero 0"] == (847360, 508416)  # 20 and 12 bytes per parameter


def test_more_nodes_shard_further(counts):
    P, L = counts.total, counts.largest_layer
    got = {e.flags: (e.gpu_bytes, e.cpu_bytes) for e in estimate_memory(counts, gpus_per_node=2, nnodes=2)}
    assert got["--zero 2"] == (2 * P + int(18 * P / 4), int(P * 4 * 2 * 1.5))
    # ZeRO-3's CPU side splits across nodes: 18 bytes per parameter over 2 nodes, 1.5 buffer
    assert got["--zero 3 --offload optimizer+param"] == (4 * L, int(P * max(4 * 2, 18 / 2) * 1.5))


@pytest.mark.parametrize("gpu_share_of_p,cpu_bytes_per_p,expected", [
    (25, 100, "--zero 0"),                        # 20 B/param fit in 80% of 25
    (12 / 0.8, 100, "--zero 1"),                  # 12 B/param exactly fit
    (11 / 0.8 + 1, 100, "--zero 2"),              # 11 B/param (ZeRO-2 over 2 GPUs)
    (2 / 0.8, 100, "--zero 2 --offload optimizer"),
    (2 / 0.8, 20, None),                          # offload needs 24 B/param of RAM: nothing fits
])
def test_the_recommendation_is_the_fastest_that_fits(counts, gpu_share_of_p, cpu_bytes_per_p, expected):
    estimates = estimate_memory(counts, gpus_per_node=2, nnodes=1)
    chosen = recommend(estimates, math.ceil(gpu_share_of_p * counts.total), cpu_bytes_per_p * counts.total)
    assert (chosen.flags if chosen else None) == expected


def test_format_bytes():
    assert [format_bytes(n) for n in (512, 1536, 847360, 3 * GiB)] == ["512 B", "1.50 KiB", "827.50 KiB", "3.00 GiB"]


def test_plan_command_prints_every_choice_and_the_recommendation(gpt2_dir):
    result = CliRunner().invoke(cli, ["plan", "--model", str(gpt2_dir), "--gpus", "2", "--gpu-memory", "0.001",
                                      "--cpu-memory", "1"], env={FAKE_GPUS_ENV: "0"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"{gpt2_dir}: 42,368 parameters, largest layer 12,800; 2 GPUs per node x 1 node = 2 GPUs"
    rows = {line[:38].strip(): line[38:].split() for line in lines if line.startswith("  --zero")}
    assert rows["--zero 0"] == ["827.50", "KiB", "496.50", "KiB"]
    assert rows["--zero 3 --offload optimizer+param"] == ["50.00", "KiB", "1.09", "MiB"]
    # 80% of 1.02 MiB = 839 KiB: ZeRO-0's 827.5 KiB fits
    assert lines[-1] == ("recommended: --zero 0, the fastest that fits 80% of 1.02 MiB per GPU (the rest for "
                         "activations) and 1.00 GiB of RAM per node")


def test_plan_without_a_gpu_asks_for_its_size(gpt2_dir):
    result = CliRunner().invoke(cli, ["plan", "--model", str(gpt2_dir)], env={FAKE_GPUS_ENV: "0"})
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == ("recommended: give --gpu-memory GiB (no GPU here to measure) for a "
                                              "recommendation")


def test_plan_of_a_missing_model_is_one_clear_error(tmp_path):
    result = CliRunner().invoke(cli, ["plan", "--model", str(tmp_path / "none"), "--gpus", "2"])
    assert result.exit_code == 2
    assert result.output == f"error: --model {tmp_path / 'none'}: no such folder\n"
