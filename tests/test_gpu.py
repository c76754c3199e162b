"""The GPU path for real: NCCL, fp16 and bf16 mixed precision, ZeRO-3 with resume, the packed-row attention
kernels, host-device syncs, the matmul peak. Marked `gpu`: `make gpu-check` runs them (with
DIALOGTRAIN_TEST_DEVICE=cuda); everywhere else they are skipped. Tiny models, a few minutes in all.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from dialogtrain.train.metrics import read_metrics
from tests.checkpoint_helpers import FIXED_PEAK, final_weights
from tests.sft_harness import PAIRS, single_process_env, train_in_process, write_pairs_csv, write_run_dir

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **FIXED_PEAK})


def step_records(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def test_the_world_is_nccl_on_cuda_0(llama_dir, tmp_path):
    import torch.distributed as dist

    from dialogtrain.train.distributed import distributed_world

    with single_process_env(), distributed_world() as world:
        assert world.device == torch.device("cuda", 0) and dist.get_backend() == "nccl"
        assert world.sum(1.5, 2.5) == [1.5, 2.5]


def test_the_seed_004_workflow_in_fp16_through_the_cli(gpt2_dir, tmp_path):
    """GPT-2 chat model, DPO on orca-schema pairs, user/assistant prompts, fp16, batch 2: the first loss is
    ln 2, metrics.jsonl is valid JSON with the fp16 skip count, RUN/final is fp16 with the embedding stored
    once and gives the engine's logits."""
    from tests.test_dpo import QUESTIONS, write_orca_jsonl

    data = write_orca_jsonl(tmp_path / "orca.jsonl", QUESTIONS[:8])
    run_dir = tmp_path / "run"
    done = cli("dpo", "--model", str(gpt2_dir), "--chat-template", "user-assistant", "--data", str(data), "--output",
               str(run_dir), "--gpus", "0", "--precision", "fp16", "--micro-batch", "2", "--epochs", "2",
               "--lr", "5e-6", "--beta", "0.1", "--max-length", "128")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # no Infinity/NaN: valid JSON
    losses = [r for r in records if "loss" in r]
    assert losses[0]["loss"] == pytest.approx(math.log(2), abs=1e-3) and "skipped_steps" in losses[-1]
    weights = final_weights(run_dir / "final")
    assert {t.dtype for t in weights.values()} == {torch.float16} and "lm_head.weight" not in weights
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float16).cuda().eval()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    fp32 = AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float32).cuda().eval()
    ids = torch.tensor([[3, 17, 42, 9, 5]], device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        assert (model(input_ids=ids).logits.float() - fp32(input_ids=ids).logits.float()).abs().max() < 5e-2


def test_bf16_sft_at_zero3_saves_and_resumes_exactly(llama_dir, tmp_path):
    """bf16 mixed precision at ZeRO-3 on one GPU: the loss falls; killed after the checkpoint of step 4
    (a copy of the run folder rewound there) and resumed, steps 5-8 log the same losses."""
    from tests.checkpoint_helpers import metrics_after, rewind

    flags = dict(model=str(llama_dir), data=str(write_pairs_csv(tmp_path / "p.csv", PAIRS)), micro_batch=2,
                 lr=1e-3, max_steps=8, save_every=4, zero=3, precision="bf16", gpus="0", keep_overlap=True)
    run_dir = tmp_path / "run"
    train_in_process(write_run_dir(run_dir, **flags))
    losses = [r["loss"] for r in step_records(run_dir)]
    assert losses[-1] < losses[0]
    resumed = rewind(run_dir, tmp_path / "resumed", step=4)
    train_in_process(write_run_dir(resumed, resume="auto", **flags))
    for a, b in zip(metrics_after(resumed, 4), metrics_after(run_dir, 4), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["varlen", "block", "sdpa"])
def test_packed_rows_give_the_padded_logps_and_gradients_on_every_attention_path(path, dtype, llama_dir,
                                                                               monkeypatch):
    import dialogtrain.train.attention as attention
    from dialogtrain.data.collate import collate_sft
    from dialogtrain.train.forward import batch_sequence_logps
    from dialogtrain.train.loop import to_device
    from tests.test_packing import Bare, encoded

    model, tokenizer, examples = encoded(llama_dir)
    model = model.cuda()
    forced = {"varlen": attention.VARLEN, "block": attention.BLOCK_MASK}.get(path)
    if forced:
        attention.attend_packed(model)
        monkeypatch.setattr(attention, "attention_path", lambda device, dtype, dropout=0.0: forced)

    def scored(packed):
        model.zero_grad()
        with torch.autocast("cuda", dtype=dtype):
            batch = to_device(collate_sft(examples, tokenizer.pad_token_id, packed=packed), torch.device("cuda"))
            logps, _ = batch_sequence_logps(Bare(model), batch)
        logps.sum().backward()
        return logps.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    packed, packed_grads = scored(True)
    attention.unpack_attention(model)
    padded, padded_grads = scored(False)
    assert (packed - padded).abs().max().item() < 0.05 * max(1.0, padded.abs().max().item())
    for name, grad in padded_grads.items():
        assert (packed_grads[name] - grad).norm() <= 0.05 * max(grad.norm(), 1e-3), name


def test_a_training_step_does_not_sync_per_micro_batch(llama_dir, tmp_path):
    """CUDA's own sync detector over a whole bf16 SFT step of 4 micro-batches: a handful of syncs, not one
    per micro-batch (the loss, the gradient norm and the metrics are read once per step)."""
    import warnings

    import dialogtrain.sft as sft

    syncs = {}
    real_step = sft.train_step

    def watched(engine, run, state, indices):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                return real_step(engine, run, state, indices)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            syncs[len(syncs)] = sum("synchroniz" in str(w.message) for w in caught)

    pytest.MonkeyPatch().setattr(sft, "train_step", watched)
    train_in_process(write_run_dir(tmp_path / "run", model=str(llama_dir), data=str(write_pairs_csv(tmp_path / "p.csv")),
                                   micro_batch=1, grad_accum=4, max_steps=2, precision="bf16", gpus="0"))
    assert syncs[1] <= 8, syncs


def test_the_matmul_peak_is_plausible_for_a_gpu():
    from dialogtrain.train.mfu import matmul_peak_flops

    peak = matmul_peak_flops("bf16", "cuda:0", budget_s=2.0)
    assert 10e12 < peak < 5e15  # a T4 reaches ~65 TFLOP/s of fp16, an H200 ~800 of bf16


def test_precision_auto_matches_this_gpu(tmp_path):
    from dialogtrain.hardware import gpu_precision

    done = cli("sft", "--model", "m", "--data", "d.csv", "--output", str(tmp_path / "run"), "--gpus", "0", "--dry-run")
    assert done.returncode == 0, done.stderr
    expected = gpu_precision(torch.cuda.get_device_capability(0))
    assert f'"precision": "{expected}"' in done.stdout


@two_gpus
def test_two_gpus_under_zero3_export_what_one_gpu_exports(llama_dir, tmp_path):
    data = str(write_pairs_csv(tmp_path / "p.csv", PAIRS))
    runs = {}
    for gpus in ("0", "0,1"):
        run_dir = tmp_path / f"gpus-{gpus.replace(',', '')}"
        done = cli("sft", "--model", str(llama_dir), "--data", data, "--output", str(run_dir), "--gpus", gpus,
                   "--zero", "3", "--precision", "fp32", "--micro-batch", str(4 // len(gpus.split(","))),
                   "--max-steps", "3", "--lr", "1e-3")
        assert done.returncode == 0, done.stderr[-3000:]
        runs[gpus] = final_weights(run_dir / "final")
    for name, tensor in runs["0"].items():
        assert (tensor - runs["0,1"][name]).abs().max().item() < 1e-3, name
