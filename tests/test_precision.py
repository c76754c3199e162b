"""What --precision does to weights, compute and updates: bf16 and fp16 are mixed precision (fp32 weights,
autocast compute), pure-bf16 keeps bf16 weights; fp16 skips overflowing updates and stops when it cannot
recover; the export keeps the run's precision. In-process on the tiny models (fp16 autocast runs on the
CPU too, which is all these tests need: the launcher refuses fp16 on a CPU for speed, not correctness)."""

from __future__ import annotations

import json

import pytest
import torch

from dialogtrain.errors import TrainingError
from dialogtrain.train.metrics import read_metrics
from tests.sft_harness import PAIRS, train_in_process, write_pairs_csv, write_run_dir
from tests.test_dpo import QUESTIONS, write_preferences_jsonl

HELD_OUT = ["hello", "what is the fox", "tell me a road", "good day to you", "who is the bot"]


def held_out_margin(run_dir) -> tuple[float, float]:
    final = [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in r][-1]
    return final["eval_rewards/margins"], final["eval_rewards/accuracies"]


def test_bf16_dpo_at_a_dpo_learning_rate_moves_the_margin_as_fp32_does(llama_dir, tmp_path):
    """8 DPO steps at lr 5e-6 (what DPO uses): mixed bf16 moves the held-out margin as fp32 does; pure bf16
    weights (DeepSpeed's bf16 mode, the old default) move it a third as far: most updates never reach
    the forward pass."""
    train = write_preferences_jsonl(tmp_path / "train.jsonl", QUESTIONS[:8])
    held = write_preferences_jsonl(tmp_path / "eval.jsonl", HELD_OUT)
    margins = {}
    for precision in ("fp32", "bf16", "pure-bf16"):
        run_dir = tmp_path / precision
        train_in_process(write_run_dir(run_dir, command="dpo", model=str(llama_dir), data=str(train),
                                       eval_data=str(held), micro_batch=2, grad_accum=2, lr=5e-6, max_steps=8,
                                       beta=0.1, precision=precision, gpus="cpu", seed=3), "dpo")
        margins[precision] = held_out_margin(run_dir)
    fp32_margin, fp32_accuracy = margins["fp32"]
    assert fp32_margin > 1e-3 and fp32_accuracy == 1.0  # fp32 itself learns (the margin starts at exactly 0)
    assert margins["bf16"][0] >= 0.5 * fp32_margin
    assert margins["pure-bf16"][0] < 0.5 * fp32_margin  # what the check above would have caught


def changed_share(engine, start: dict) -> float:
    """The share of weight elements that differ from `start` (names as in the saved model)."""
    state = engine.module.state_dict()
    changed = sum(int((state[name].float() != tensor.float()).sum()) for name, tensor in start.items())
    return changed / sum(tensor.numel() for tensor in start.values())


def test_mixed_bf16_keeps_fp32_weights_and_every_update_reaches_them(llama_dir, tmp_path):
    """SFT, 2 steps at lr 5e-6: under bf16 the weights and the optimizer's parameters are the model's own
    fp32 tensors (no second copy), and as many weights move as in fp32; pure bf16 holds bf16 weights,
    most of which a step that small leaves where they were."""
    from safetensors.torch import load_file

    start = load_file(str(llama_dir / "model.safetensors"))
    data = write_pairs_csv(tmp_path / "pairs.csv", PAIRS)
    shares = {}
    for precision in ("fp32", "bf16", "pure-bf16"):
        engine = train_in_process(write_run_dir(tmp_path / precision, model=str(llama_dir), data=str(data),
                                                micro_batch=2, lr=5e-6, max_steps=2, precision=precision,
                                                gpus="cpu", seed=3))
        weights = list(engine.module.parameters())
        if precision == "bf16":
            assert {p.dtype for p in weights} == {torch.float32}
            assert engine.torch_autocast_enabled() and engine.torch_autocast_dtype() == torch.bfloat16
            optimized = [p for group in engine.optimizer.param_groups for p in group["params"]]
            assert {id(p) for p in optimized} == {id(p) for p in weights}  # the update writes the weights
        if precision == "pure-bf16":
            assert {p.dtype for p in weights} == {torch.bfloat16}
        shares[precision] = changed_share(engine, {name: tensor.to(weights[0].dtype) for name, tensor in start.items()})
    assert shares["fp32"] > 0.5  # every weight with a gradient moves (unused embedding rows do not)
    assert shares["bf16"] == pytest.approx(shares["fp32"], abs=0.01)
    assert shares["pure-bf16"] < 0.5 * shares["fp32"]


def step_records(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize("zero", [0, 2])
def test_fp16_skips_an_overflowing_update_logs_valid_json_and_holds_the_schedule(zero, llama_dir, tmp_path,
                                                                               monkeypatch):
    """Step 3's loss is made infinite: the update is skipped (the weights stay), the loss scale halves,
    metrics.jsonl says so in valid JSON (no Infinity), the LR schedule does not advance for it, and the
    next steps train on."""
    import dialogtrain.sft as sft

    calls, sft_loss = [], sft.sft_loss

    def overflow_at_step_3(*args):
        calls.append(1)
        return sft_loss(*args) * (float("inf") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(sft, "sft_loss", overflow_at_step_3)
    run_dir = tmp_path / "run"
    engine = train_in_process(write_run_dir(run_dir, model=str(llama_dir), data=str(write_pairs_csv(tmp_path / "p.csv")),
                                            micro_batch=2, lr=1e-3, max_steps=5, precision="fp16", gpus="cpu",
                                            zero=zero))
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert not any("Infinity" in line or "NaN" in line for line in lines)
    records = [json.loads(line) for line in lines]
    skipped = records[2]
    assert skipped["step"] == 3 and skipped["skipped"] is True and skipped["grad_norm"] is None
    assert skipped["skipped_steps"] == 1 and records[-1]["skipped_steps"] == 1
    assert all("skipped" not in r for i, r in enumerate(records) if i != 2)
    lrs = [r["lr"] for r in records]
    assert lrs[3] == lrs[2] and lrs[2] < lrs[1] < lrs[0]  # the skipped step did not use up the schedule
    assert all(r["grad_norm"] is not None and 0 < r["grad_norm"] < 100 for i, r in enumerate(records) if i != 2)
    from dialogtrain.train.engine import grad_scaler

    assert grad_scaler(engine).get_scale() == 2.0**15  # torch's 2^16 halved once
    assert all(torch.isfinite(p).all() for p in engine.module.parameters())


def test_fp16_reports_the_true_gradient_norm_and_zero2_clips_it_like_zero0(llama_dir, tmp_path):
    """The loss scale (2^16) is taken out of the reported gradient norm, and ZeRO-2 clips against the
    true norm (DeepSpeed alone clips the scaled one): both stages train the same weights as fp32 does,
    within fp16's rounding."""
    data = str(write_pairs_csv(tmp_path / "p.csv"))
    runs = {}
    for name, precision, zero in (("fp32", "fp32", 0), ("fp16-zero0", "fp16", 0), ("fp16-zero2", "fp16", 2)):
        engine = train_in_process(write_run_dir(tmp_path / name, model=str(llama_dir), data=data, micro_batch=2,
                                                lr=1e-3, max_steps=3, grad_clip=1.0, precision=precision,
                                                gpus="cpu", zero=zero))
        runs[name] = ({n: p.detach().float().clone() for n, p in engine.module.named_parameters()},
                      step_records(tmp_path / name))
    fp32_weights, fp32_records = runs["fp32"]
    for name in ("fp16-zero0", "fp16-zero2"):
        weights, records = runs[name]
        assert records[0]["grad_norm"] == pytest.approx(fp32_records[0]["grad_norm"], rel=0.01), name
        assert max((weights[n] - fp32_weights[n]).abs().max().item() for n in weights) < 3e-3, name
    zero0, zero2 = runs["fp16-zero0"][0], runs["fp16-zero2"][0]
    assert max((zero0[n] - zero2[n]).abs().max().item() for n in zero0) < 1e-4


def test_fp16_stops_cleanly_when_every_update_overflows(llama_dir, tmp_path, monkeypatch):
    """A forward that overflows at every loss scale: after MAX_CONSECUTIVE_SKIPS skipped updates in a row
    the run stops with exit code 3 and a message, the last checkpoint intact and no final/."""
    import dialogtrain.sft as sft
    import dialogtrain.train.loop as loop

    calls, sft_loss = [], sft.sft_loss

    def overflow_from_step_3(*args):
        calls.append(1)
        return sft_loss(*args) * (float("inf") if len(calls) >= 3 else 1.0)

    monkeypatch.setattr(sft, "sft_loss", overflow_from_step_3)
    monkeypatch.setattr(loop, "MAX_CONSECUTIVE_SKIPS", 4)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingError) as stopped:
        train_in_process(write_run_dir(run_dir, model=str(llama_dir), data=str(write_pairs_csv(tmp_path / "p.csv")),
                                       micro_batch=2, lr=1e-3, max_steps=12, save_every=2, precision="fp16",
                                       gpus="cpu"))
    assert stopped.value.exit_code == 3
    assert str(stopped.value).startswith("fp16: the last 4 updates (to step 6) were all skipped")
    assert f"The last good checkpoint is {run_dir / 'checkpoints' / 'step-000006'}" in str(stopped.value) or \
        f"The last good checkpoint is {run_dir / 'checkpoints' / 'step-000004'}" in str(stopped.value)
    assert not (run_dir / "final").exists()
    assert [r["step"] for r in step_records(run_dir)][:2] == [1, 2]


@pytest.mark.parametrize("precision, export_fp32, dtype", [("bf16", False, torch.bfloat16),
                                                            ("bf16", True, torch.float32),
                                                            ("fp32", False, torch.float32)])
def test_the_export_keeps_the_runs_precision_and_the_trained_logits(precision, export_fp32, dtype, gpt2_dir,
                                                                    tmp_path):
    """RUN/final holds the weights in the run's precision (fp32 on request), tied embeddings once, and
    plain transformers gives the logits the engine computes, within that precision."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    engine = train_in_process(write_run_dir(run_dir, model=str(gpt2_dir), data=str(write_pairs_csv(tmp_path / "p.csv")),
                                            micro_batch=2, lr=1e-3, max_steps=2, precision=precision,
                                            export_fp32=export_fp32, gpus="cpu"))
    weights = load_file(str(run_dir / "final" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {dtype}
    assert json.loads((run_dir / "final" / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    assert "lm_head.weight" not in weights  # tied to the embeddings: written once
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=dtype).eval()
    ids = torch.tensor([[3, 17, 42, 9, 5]])
    engine.eval()
    with torch.no_grad():
        trained = engine(input_ids=ids).logits.float()  # under the engine's autocast, as in training
        loaded = exported(input_ids=ids).logits.float()
    tolerance = 2e-2 if dtype == torch.bfloat16 or precision == "bf16" else 1e-5
    assert (trained - loaded).abs().max().item() < tolerance * max(1.0, trained.abs().max().item())


def test_tied_weights_stay_one_tensor_when_the_export_copies_them():
    """state_dict() gives tied parameters as two views of one storage; a copy per view (moving them off a
    GPU, or a cast) must still give one tensor, or save_pretrained writes the embedding twice."""
    from dialogtrain.export.hf import cast_state_dict, convert_state_dict

    embedding = torch.nn.Parameter(torch.randn(4, 3))
    state = {"wte.weight": embedding.detach(), "lm_head.weight": embedding.detach(), "bias": torch.zeros(3)}
    assert state["wte.weight"] is not state["lm_head.weight"]
    copied = convert_state_dict(state, lambda tensor: tensor.clone())  # what .cpu() does to a GPU tensor
    assert copied["wte.weight"] is copied["lm_head.weight"] and copied["bias"] is not copied["wte.weight"]
    cast = cast_state_dict(state, torch.bfloat16)
    assert cast["wte.weight"] is cast["lm_head.weight"] and cast["wte.weight"].dtype == torch.bfloat16
