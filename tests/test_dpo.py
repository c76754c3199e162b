"""The DPO worker: batching, agreement with TRL, the first step, learning, the precomputed reference,
orca-schema data, and (through the CLI) two processes under ZeRO-3."""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dialogtrain.data.collate import collate_preferences
from dialogtrain.data.encode import IGNORE_INDEX
from dialogtrain.train.losses import dpo_sigmoid_loss, sequence_logps
from dialogtrain.train.metrics import read_metrics
from tests.sft_harness import train_in_process, write_pairs_csv, write_run_dir

QUESTIONS = ["hello there", "what is your name", "tell me a joke please", "what is the weather like",
             "good bye", "how are you today", "who are you", "the quick brown fox", "tell me about the dog",
             "what is the road like", "are you a bot", "is it warm outside"]
CHOSEN = "i am fine thank you"
REJECTED = "why did the chicken cross the road"


def write_preferences_jsonl(path: Path, questions=QUESTIONS, chosen=CHOSEN, rejected=REJECTED) -> Path:
    with open(path, "w") as f:
        for question in questions:
            f.write(json.dumps({"prompt": question, "chosen": chosen, "rejected": rejected}) + "\n")
    return path


def write_orca_jsonl(path: Path, questions=QUESTIONS) -> Path:
    """The Intel/orca_dpo_pairs schema: system, question, chosen, rejected."""
    with open(path, "w") as f:
        for i, question in enumerate(questions):
            f.write(json.dumps({"system": "you are a helpful bot" if i % 2 else "", "question": question,
                                "chosen": CHOSEN, "rejected": REJECTED}) + "\n")
    return path


def count_models(class_name: str) -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if type(obj).__name__ == class_name)


def step_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def encode_eval_set(tokenizer, data: Path, max_length: int) -> list[dict]:
    from dialogtrain.data.encode import encode_preferences
    from dialogtrain.data.load import load_preferences

    preferences, _ = load_preferences(str(data))
    return encode_preferences(tokenizer, preferences, max_length)[0]


@torch.no_grad()
def direct_eval(policy_dir: Path, reference_dir: Path, examples: list[dict], beta: float) -> dict[str, float]:
    """The eval metrics of all pairs at once, in plain transformers: what the worker's eval must report."""
    from transformers import AutoModelForCausalLM

    batch = collate_preferences(examples, pad_id=0)
    logps = []
    for folder in (policy_dir, reference_dir):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps.append(sequence_logps(logits, batch["labels"])[0].chunk(2))
    (policy_chosen, policy_rejected), (ref_chosen, ref_rejected) = logps
    losses, chosen, rejected = dpo_sigmoid_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return {"eval_loss": losses.mean().item(), "eval_rewards/accuracies": (chosen > rejected).float().mean().item(),
            "eval_rewards/margins": (chosen - rejected).mean().item(), "eval_logps/chosen": policy_chosen.mean().item()}


def test_collate_preferences_puts_the_chosen_rows_first():
    examples = [{"chosen_ids": [5, 6, 7], "chosen_labels": [-100, 6, 7], "rejected_ids": [5, 8], "rejected_labels": [-100, 8]},
                {"chosen_ids": [9, 1], "chosen_labels": [-100, 1], "rejected_ids": [9, 2, 3, 4],
                 "rejected_labels": [-100, 2, 3, 4]}]
    batch = collate_preferences(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [9, 1, 0, 0], [5, 8, 0, 0], [9, 2, 3, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [-100, 1, -100, -100], [-100, 8, -100, -100],
                                        [-100, 2, 3, 4]]


def test_label_smoothing_outside_sigmoid_is_refused_with_the_options():
    from dialogtrain.options import OptionsError, RunOptions

    with pytest.raises(OptionsError) as refused:
        RunOptions.from_flat("dpo", {"model": "m", "data": "d", "output": "o", "loss": "hinge",
                                     "label_smoothing": 0.1})
    assert refused.value.problems == ["--label-smoothing 0.1 applies to --loss sigmoid only, not --loss hinge"]


def test_first_step_with_reference_equal_to_policy_is_ln2_with_zero_rewards(gpt2_dir, tmp_path):
    """GPT-2 has dropout 0.1: the worker turns it off, or the policy's log-probs would be noisy."""
    data = write_preferences_jsonl(tmp_path / "prefs.jsonl")
    run_dir = tmp_path / "run"
    run_json = write_run_dir(run_dir, command="dpo", model=str(gpt2_dir), data=str(data), micro_batch=2,
                             grad_accum=2, max_steps=2, lr=1e-2, precision="fp32", gpus="cpu")
    train_in_process(run_json, "dpo")
    first, second = step_records(run_dir)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert first[name] == 0.0, name
    assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0
    assert {"step", "epoch", "lr", "grad_norm", "tokens_per_s", "target_tokens"} <= set(first)
    assert second["loss"] < first["loss"] and second["rewards/margins"] > 0


@pytest.mark.parametrize("loss, first_loss", [("hinge", 1.0), ("ipo", (1 / (2 * 0.1)) ** 2)])
def test_other_losses_start_from_their_value_at_zero_log_ratio(loss, first_loss, llama_dir, tmp_path):
    """h = 0 at the first step: hinge relu(1 - 0) = 1, ipo (0 - 1/(2 beta))^2 = 25 at beta 0.1."""
    data = write_preferences_jsonl(tmp_path / "prefs.jsonl", QUESTIONS[:4])
    run_dir = tmp_path / "run"
    run_json = write_run_dir(run_dir, command="dpo", model=str(llama_dir), data=str(data), micro_batch=4,
                             max_steps=1, loss=loss, beta=0.1, precision="fp32", gpus="cpu")
    train_in_process(run_json, "dpo")
    assert step_records(run_dir)[0]["loss"] == pytest.approx(first_loss, rel=1e-6)


def test_ref_model_is_loaded_and_must_share_the_tokenizer(llama_dir, gpt2_dir, tmp_path):
    from dialogtrain.errors import UserError

    data = write_preferences_jsonl(tmp_path / "prefs.jsonl", QUESTIONS[:4])
    run_dir = tmp_path / "run"
    run_json = write_run_dir(run_dir, command="dpo", model=str(llama_dir), ref_model=str(llama_dir), data=str(data),
                             micro_batch=4, max_steps=1, precision="fp32", gpus="cpu")
    train_in_process(run_json, "dpo")
    assert step_records(run_dir)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    run_json = write_run_dir(tmp_path / "other", command="dpo", model=str(llama_dir), ref_model=str(gpt2_dir),
                             data=str(data), micro_batch=4, max_steps=1, precision="fp32", gpus="cpu")
    with pytest.raises(UserError, match="--ref-model .* tokenizer differs"):
        train_in_process(run_json, "dpo")


def test_a_nan_loss_stops_the_run_with_a_training_error(llama_dir, tmp_path, monkeypatch):
    import dialogtrain.dpo as dpo
    from dialogtrain.errors import TrainingError

    def nan_loss(*args, **kwargs):
        losses, chosen, rejected = dpo_sigmoid_loss(*args, **kwargs)
        return losses * float("nan"), chosen, rejected

    monkeypatch.setitem(dpo.PREFERENCE_LOSSES, "sigmoid",
                        dataclasses.replace(dpo.PREFERENCE_LOSSES["sigmoid"], function=nan_loss))
    data = write_preferences_jsonl(tmp_path / "prefs.jsonl", QUESTIONS[:4])
    run_json = write_run_dir(tmp_path / "run", command="dpo", model=str(llama_dir), data=str(data), micro_batch=4,
                             max_steps=2, precision="fp32", gpus="cpu")
    with pytest.raises(TrainingError, match="loss is nan at step 1"):
        train_in_process(run_json, "dpo")
    assert not (tmp_path / "run" / "final").exists()


def test_micro_batch_times_accumulation_split_gives_the_same_weights(llama_dir, tmp_path):
    """The loss is the mean over the step's pairs, whatever the split; rpo-alpha adds a per-pair term."""
    from safetensors.torch import load_file

    data = write_preferences_jsonl(tmp_path / "prefs.jsonl", QUESTIONS[:8])
    weights = []
    for micro, accum in [(4, 1), (1, 4)]:
        run_dir = tmp_path / f"run-{micro}x{accum}"
        run_json = write_run_dir(run_dir, command="dpo", model=str(llama_dir), data=str(data), micro_batch=micro,
                                 grad_accum=accum, lr=1e-2, max_steps=2, rpo_alpha=0.5, precision="fp32",
                                 gpus="cpu", seed=3)
        train_in_process(run_json, "dpo")
        weights.append(load_file(str(run_dir / "final" / "model.safetensors")))
    start = load_file(str(llama_dir / "model.safetensors"))
    for name, tensor in weights[0].items():
        assert not torch.equal(tensor, start[name]) or "norm" in name, f"{name} did not change"
        assert (tensor - weights[1][name]).abs().max().item() < 1e-5, name


def test_learns_a_synthetic_preference_task_and_evaluates_the_whole_eval_set(llama_dir, tmp_path):
    """Chosen is always one answer, rejected another; held-out prompts. 5 eval pairs at micro-batch 2 is
    three eval batches, so a metric of the last batch alone would differ from the whole-set value."""
    from transformers import AutoTokenizer

    train = write_preferences_jsonl(tmp_path / "train.jsonl", QUESTIONS[:8])
    held_out = write_preferences_jsonl(tmp_path / "eval.jsonl", ["hello", "what is the fox", "tell me a road",
                                                                 "good day to you", "who is the bot"])
    run_dir = tmp_path / "run"
    run_json = write_run_dir(run_dir, command="dpo", model=str(llama_dir), data=str(train), eval_data=str(held_out),
                             micro_batch=2, grad_accum=2, lr=5e-3, max_steps=8, eval_every=4, beta=0.1,
                             eval_on_start=True, precision="fp32", gpus="cpu")
    train_in_process(run_json, "dpo")
    records = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8]  # before training, every --eval-every steps and at the end
    # before any update the policy is its reference: every reward 0, so the loss is -log sigmoid(0) = log 2
    assert evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[0]["eval_rewards/margins"] == 0 and evals[0]["eval_rewards/accuracies"] == 0
    final = evals[-1]
    assert final["eval_rewards/accuracies"] > 0.9
    assert final["eval_rewards/margins"] > 0 and final["eval_loss"] < math.log(2)
    assert set(final) >= {f"eval_{name}" for name in ("loss", "rewards/chosen", "rewards/rejected",
                                                       "rewards/accuracies", "rewards/margins", "logps/chosen",
                                                       "logps/rejected")}
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    expected = direct_eval(run_dir / "final", llama_dir, encode_eval_set(tokenizer, held_out, 512), beta=0.1)
    for name, value in expected.items():
        assert final[name] == pytest.approx(value, abs=1e-4), name


def test_precomputed_reference_gives_the_live_losses_and_holds_no_second_model(llama_dir, tmp_path, monkeypatch):
    import dialogtrain.dpo as dpo
    import dialogtrain.train.reference as reference

    models_during_training = []
    real_train_step = dpo.train_step
    already_alive = count_models("LlamaForCausalLM")  # kept by earlier tests of the same session, if any

    def counting_train_step(engine, *args, **kwargs):
        assert type(engine.module).__name__ == "LlamaForCausalLM"
        models_during_training.append(count_models("LlamaForCausalLM") - already_alive)
        return real_train_step(engine, *args, **kwargs)

    monkeypatch.setattr(dpo, "train_step", counting_train_step)
    data = write_preferences_jsonl(tmp_path / "prefs.jsonl", QUESTIONS[:8])
    held_out = write_preferences_jsonl(tmp_path / "eval.jsonl", QUESTIONS[8:11])
    runs = {}
    for name, precompute in [("live", False), ("precomputed", True)]:
        models_during_training.clear()
        run_dir = tmp_path / name
        run_json = write_run_dir(run_dir, command="dpo", model=str(llama_dir), data=str(data), eval_data=str(held_out),
                                 micro_batch=2, grad_accum=2, lr=1e-2, max_steps=4, eval_every=2,
                                 precompute_ref=precompute, precision="fp32", gpus="cpu")
        train_in_process(run_json, "dpo")
        runs[name] = (read_metrics(run_dir / "metrics.jsonl"), list(models_during_training))
    (live, live_models), (cached, cached_models) = runs["live"], runs["precomputed"]
    assert live_models == [2, 2, 2, 2]  # the count sees the live reference: policy + frozen copy
    assert cached_models == [1, 1, 1, 1]  # precomputed: the policy only
    assert len(live) == len(cached)
    for a, b in zip(live, cached, strict=True):
        for key in ("loss", "rewards/chosen", "rewards/margins", "eval_loss", "eval_rewards/margins"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)

    cache = torch.load(tmp_path / "precomputed" / "ref_logps.pt", weights_only=True)
    assert cache["logps"].shape == (8 + 3, 2) and len(cache["fingerprint"]) == 64

    # A matching cache (a resumed run) is reused: no reference model is loaded at all.
    def no_reference(*args, **kwargs):
        raise AssertionError("the reference model was loaded although the cache matches")

    monkeypatch.setattr(reference, "load_reference_engine", no_reference)
    again = tmp_path / "again"
    run_json = write_run_dir(again, command="dpo", model=str(llama_dir), data=str(data), eval_data=str(held_out),
                             micro_batch=2, grad_accum=2, lr=1e-2, max_steps=4, eval_every=2,
                             precompute_ref=True, precision="fp32", gpus="cpu")
    (again / "ref_logps.pt").write_bytes((tmp_path / "precomputed" / "ref_logps.pt").read_bytes())
    train_in_process(run_json, "dpo")
    assert [r["loss"] for r in step_records(again)] == [r["loss"] for r in step_records(tmp_path / "precomputed")]

    # Other pairs (here: a shorter max length) do not match the cache: it is recomputed.
    other = tmp_path / "other"
    run_json = write_run_dir(other, command="dpo", model=str(llama_dir), data=str(data), micro_batch=2,
                             grad_accum=2, max_steps=1, max_length=12, precompute_ref=True, precision="fp32",
                             gpus="cpu")
    (other / "ref_logps.pt").write_bytes((tmp_path / "precomputed" / "ref_logps.pt").read_bytes())
    with pytest.raises(AssertionError, match="reference model was loaded"):
        train_in_process(run_json, "dpo")


def test_orca_schema_trains_through_the_worker(gpt2_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    data = write_orca_jsonl(tmp_path / "orca.jsonl")
    run_dir = tmp_path / "run"
    run_json = write_run_dir(run_dir, command="dpo", model=str(gpt2_dir), data=str(data), eval_data=str(data),
                             keep_overlap=True, micro_batch=2, grad_accum=1, epochs=1, lr=1e-2, precision="fp32", gpus="cpu")
    train_in_process(run_json, "dpo")
    steps = step_records(run_dir)
    assert [r["step"] for r in steps] == list(range(1, len(QUESTIONS) // 2 + 1))
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert AutoModelForCausalLM.from_pretrained(run_dir / "final") is not None


def dialogtrain_cli() -> list[str]:
    script = Path(sys.executable).parent / "dialogtrain"
    return [str(script)] if script.exists() else [sys.executable, "-c", "from launcher.cli import main; main()"]


@pytest.mark.slow
def test_sft_then_dpo_through_the_cli_with_two_processes_under_zero3(gpt2_dir, tmp_path):
    """`dialogtrain dpo --model RUN_SFT/final` on orca data, 2 CPU processes, ZeRO-3, live reference at
    ZeRO-3; then the same with --precompute-ref (the table gathered from both ranks) gives the same
    losses; the export loads in plain transformers and the final eval equals a direct computation."""
    from transformers import AutoTokenizer

    sft_dir = tmp_path / "sft"
    train_in_process(write_run_dir(sft_dir, model=str(gpt2_dir), data=str(write_pairs_csv(tmp_path / "pairs.csv")),
                                   micro_batch=4, max_steps=2, lr=1e-2, precision="fp32", gpus="cpu"), module="sft")
    data = write_orca_jsonl(tmp_path / "orca.jsonl", QUESTIONS[:8])
    held_out = write_orca_jsonl(tmp_path / "eval.jsonl", QUESTIONS[8:11])  # 3 pairs: rank 1 runs an empty batch
    repo = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    losses = {}
    for name, extra in [("dpo", []), ("dpo-pre", ["--precompute-ref"])]:
        run_dir = tmp_path / name
        argv = [*dialogtrain_cli(), "dpo", "--model", str(sft_dir / "final"), "--data", str(data),
                "--eval-data", str(held_out), "--output", str(run_dir), "--gpus", "cpu", "--nproc", "2",
                "--zero", "3", "--precision", "fp32", "--micro-batch", "2", "--grad-accum", "1",
                "--epochs", "2", "--lr", "1e-2", "--beta", "0.1", *extra]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=540)
        assert done.returncode == 0, done.stderr[-4000:]
        losses[name] = [r["loss"] for r in step_records(run_dir)]
        assert len(losses[name]) == 4
    assert losses["dpo"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses["dpo-pre"] == pytest.approx(losses["dpo"], abs=1e-5)

    final = [r for r in read_metrics(tmp_path / "dpo" / "metrics.jsonl") if "eval_loss" in r][-1]
    tokenizer = AutoTokenizer.from_pretrained(sft_dir / "final")
    expected = direct_eval(tmp_path / "dpo" / "final", sft_dir / "final", encode_eval_set(tokenizer, held_out, 512),
                           beta=0.1)
    for name, value in expected.items():
        assert final[name] == pytest.approx(value, abs=1e-4), name


def test_per_pair_logps_and_sigmoid_loss_equal_trl(llama_tokenizer, llama_dir, tmp_path):
    """The same token ids, policy and (perturbed) reference weights through TRL's DPOTrainer:
    `compute_ref_log_probs` (TRL's per-pair log-prob sums, run with either model) and `compute_loss`
    (its sigmoid DPO loss, mean over pairs) agree with sequence_logps and dpo_sigmoid_loss in fp32."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from dialogtrain.data.encode import render_preference

    tokenizer = llama_tokenizer
    policy = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=noise))
    rows = [([{"role": "system", "content": "you are a helpful bot"}, {"role": "user", "content": "what is your name"}],
             "my name is bot", "the quick brown fox"),
            ([{"role": "user", "content": "tell me a joke please"}], "why did the chicken cross the road", "good bye"),
            ([{"role": "user", "content": "hello there"}], "hi how are you today", "what is the weather like")]
    ours, theirs = [], []
    for prompt, chosen, rejected in rows:
        chosen_ids, chosen_labels, rejected_ids, rejected_labels, _ = render_preference(
            tokenizer, prompt, chosen, rejected, 128)
        start = next(i for i, label in enumerate(chosen_labels) if label != IGNORE_INDEX)  # first completion token
        ours.append({"chosen_ids": chosen_ids, "chosen_labels": chosen_labels, "rejected_ids": rejected_ids,
                     "rejected_labels": rejected_labels})
        theirs.append({"prompt_ids": chosen_ids[:start], "chosen_ids": chosen_ids[start:],
                       "rejected_ids": rejected_ids[start:]})

    batch = collate_preferences(ours, tokenizer.pad_token_id)
    with torch.no_grad():
        policy_logps, reference_logps = (
            sequence_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                           batch["labels"])[0] for model in (policy, reference))
    loss = dpo_sigmoid_loss(*policy_logps.chunk(2), *reference_logps.chunk(2), beta=0.1)[0].mean()

    dataset = Dataset.from_list([{"prompt": p, "chosen": [{"role": "assistant", "content": c}],
                                  "rejected": [{"role": "assistant", "content": r}]} for p, c, r in rows])
    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False, fp16=False,
                     beta=0.1, loss_type=["sigmoid"], max_length=None, gradient_checkpointing=False,
                     per_device_train_batch_size=3, save_strategy="no", logging_strategy="no")
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=dataset,
                         processing_class=tokenizer)
    trl_batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(theirs)
    assert torch.equal(trl_batch["input_ids"], batch["input_ids"])
    assert torch.equal(trl_batch["input_ids"].masked_fill(trl_batch["completion_mask"] == 0, IGNORE_INDEX),
                       batch["labels"])
    with torch.no_grad():
        trl_policy = torch.cat(trainer.compute_ref_log_probs(trainer.model, trl_batch))
        trl_reference = torch.cat(trainer.compute_ref_log_probs(trainer.ref_model, trl_batch))
        trl_loss = trainer.compute_loss(trainer.model, trl_batch)
    assert (policy_logps - trl_policy).abs().max().item() < 1e-5
    assert (reference_logps - trl_reference).abs().max().item() < 1e-5
    assert abs(loss.item() - trl_loss.item()) < 1e-5
    assert not torch.allclose(policy_logps, reference_logps, atol=1e-2)  # the check compares distinct models
    metrics = trainer._metrics["eval" if not trainer.model.training else "train"]
    chosen_rewards = 0.1 * (policy_logps - reference_logps).chunk(2)[0]
    assert metrics["rewards/chosen"][-1] == pytest.approx(chosen_rewards.mean().item(), abs=1e-5)


@pytest.mark.parametrize("zero, offload, precision", [(3, "optimizer+param", "fp16"), (2, "optimizer", "bf16"),
                                                      (0, "none", "fp32")])
def test_reference_config_is_the_policys_without_training_parts(zero, offload, precision):
    """ZeRO-3 (with parameter offload) when the policy is at ZeRO-3, stage 0 otherwise; same precision
    and batch sizes; no optimizer, scheduler, clipping or optimizer offload."""
    from dialogtrain.options import RunOptions
    from dialogtrain.train.reference import reference_ds_config
    from launcher.ds_config import build_ds_config, load_template

    options = RunOptions.from_flat("dpo", {"model": "m", "data": "d", "output": "o", "zero": zero, "offload": offload,
                                           "precision": precision, "micro_batch": 2, "grad_accum": 3}, world_size=2)
    policy = {**build_ds_config(options, load_template(options), device="cuda"), "scheduler": {"type": "WarmupLR"}}
    reference = reference_ds_config(policy)
    assert not {"optimizer", "scheduler", "gradient_clipping"} & set(reference)
    assert reference["fp16"] == policy["fp16"] and reference["bf16"] == policy["bf16"]
    assert reference["train_batch_size"] == 12 and reference["train_micro_batch_size_per_gpu"] == 2
    if zero == 3:
        assert reference["zero_optimization"]["stage"] == 3
        assert reference["zero_optimization"]["offload_param"] == policy["zero_optimization"]["offload_param"]
        assert "offload_optimizer" not in reference["zero_optimization"]
    else:
        assert reference["zero_optimization"] == {"stage": 0}
    assert "optimizer" in policy and policy["zero_optimization"]["stage"] == zero  # the policy's is untouched
