"""KTO: rated-completion data (formats, bad rows, encoding), the KL rows, the balance note, the worker (first
step, equal weights across splits, learning) and `dialogtrain kto` through the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from dialogtrain.data.collate import mismatched_rows
from dialogtrain.data.encode import IGNORE_INDEX, encode_ratings
from dialogtrain.data.load import load_ratings
from dialogtrain.data.rows import Rating
from dialogtrain.data.sources import DataError
from dialogtrain.kto import balance_note, kl_partners, ranking_accuracy
from dialogtrain.train.metrics import read_metrics
from tests.sft_harness import train_in_process, write_run_dir
from tests.test_dpo import QUESTIONS, dialogtrain_cli, write_preferences_jsonl

GOOD, BAD = "i am fine thank you", "why did the chicken cross the road"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_ratings(path: Path, questions=QUESTIONS, good_every: int = 2) -> Path:
    """Unpaired: question k rated desirable with GOOD when k % good_every == 0, else undesirable with BAD."""
    return write_jsonl(path, [{"prompt": q, "completion": GOOD if k % good_every == 0 else BAD,
                               "label": k % good_every == 0} for k, q in enumerate(questions)])


# --- data ------------------------------------------------------------------------------------------------

def test_every_rating_form_loads_and_pairs_give_one_of_each(tmp_path):
    hi = [{"role": "user", "content": "hi"}]
    data = write_jsonl(tmp_path / "ratings.jsonl", [
        {"prompt": "hi", "completion": "hello", "label": True},
        {"prompt": hi, "completion": [{"role": "assistant", "content": "go away"}], "label": False},  # TRL's
        {"messages": [*hi, {"role": "assistant", "content": "hey"}], "label": "TRUE"},  # the rated reply last
        {"messages": hi, "completion": "yo", "label": "false", "system": "ignored without prompt"},
        {"prompt": "hi", "system": "be brief", "completion": "hello", "label": True},
        {"prompt": "hi", "chosen": "hello", "rejected": "go away"},  # a pair: one desirable, one undesirable
    ])
    ratings, report = load_ratings(str(data))
    assert ratings == [Rating(hi, "hello", True), Rating(hi, "go away", False), Rating(hi, "hey", True),
                       Rating(hi, "yo", False), Rating([{"role": "system", "content": "be brief"}, *hi], "hello", True),
                       Rating(hi, "hello", True), Rating(hi, "go away", False)]
    assert report.summary() == "data: 6 rows from 1 file -> 7 rated completions"
    assert len(report.origins) == 7


def test_csv_labels_read_true_and_false(tmp_path):
    data = tmp_path / "ratings.csv"
    data.write_text("prompt,completion,label\nhi,hello,True\nhi,go away,false\n")
    assert [r.desirable for r in load_ratings(str(data))[0]] == [True, False]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "hi", "completion": "hello"}, "line 1 field 'label': missing field"),
    ({"prompt": "hi", "completion": "hello", "label": "yes"},
     "line 1 field 'label': wrong type: expected true or false, got string 'yes'"),
    ({"prompt": "hi", "completion": "hello", "label": 1}, "line 1 field 'label': wrong type: expected true or "
                                                           "false, got number 1"),
    ({"prompt": "hi", "completion": "  ", "label": True}, "line 1 field 'completion': empty completion"),
    ({"prompt": "hi", "label": True}, "line 1 field 'completion': missing field"),
    ({"messages": [{"role": "user", "content": "hi"}], "label": True},
     "line 1 field 'messages': no assistant turn: without 'completion', the last message is the rated one"),
    ({"prompt": [{"role": "assistant", "content": "hi"}], "completion": "x", "label": True},
     "line 1 field 'prompt[0]': roles out of order: expected user, got assistant"),
])
def test_bad_rating_rows_name_the_row_and_field(tmp_path, row, message):
    data = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError) as error:
        load_ratings(str(data))
    assert str(error.value) == f"{data} {message}"


def test_bad_rows_are_skipped_and_counted(tmp_path):
    data = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "hi", "completion": "a", "label": True},
                                                  {"prompt": "hi", "completion": "b", "label": "maybe"},
                                                  {"prompt": "hi", "completion": "", "label": False}])
    ratings, report = load_ratings(str(data), skip_bad_rows=True)
    assert [r.completion for r in ratings] == ["a"]
    assert report.dropped == {"wrong type": 1, "empty completion": 1}


def test_encode_ratings_learns_the_completion_and_records_where_it_starts(gpt2_tokenizer):
    tok = gpt2_tokenizer
    eos = tok.eos_token_id
    examples, stats = encode_ratings(tok, [Rating([{"role": "user", "content": "hi"}], "yes", False)], 64)
    hi, yes = tok.encode("hi"), tok.encode("yes")
    assert examples == [{"input_ids": hi + [eos] + yes + [eos], "labels": [IGNORE_INDEX] * (len(hi) + 1) + yes + [eos],
                         "prompt_length": len(hi) + 1, "desirable": False}]
    assert stats.examples == 1 and stats.skipped == 0


def test_kl_rows_join_each_prompt_to_the_next_examples_completion():
    first = {"input_ids": [1, 2, 3], "labels": [-100, -100, 3], "prompt_length": 2}
    second = {"input_ids": [7, 8, 9], "labels": [-100, 8, 9], "prompt_length": 1}
    assert mismatched_rows([first, second], [second, first], max_length=8) == [
        {"input_ids": [1, 2, 8, 9], "labels": [-100, -100, 8, 9]}, {"input_ids": [7, 3], "labels": [-100, 3]}]
    assert mismatched_rows([first], [second], max_length=3) == [{"input_ids": [1, 2, 8], "labels": [-100, -100, 8]}]
    assert kl_partners([3, 0, 5]) == {3: 0, 0: 5, 5: 3}


def test_balance_note_names_the_weights_that_balance_the_data():
    examples = [{"desirable": True}] * 30 + [{"desirable": False}] * 10
    assert balance_note(examples, 1.0, 1.0) == (
        "note: 30 desirable and 10 undesirable completions weigh 3.00 : 1 (--kto-desirable-weight 1 x 30 / "
        "--kto-undesirable-weight 1 x 10); KTO's paper keeps this within [1, 4/3]: --kto-undesirable-weight 3 "
        "(or --kto-desirable-weight 0.333) makes it 1")
    assert balance_note(examples, 1.0, 3.0) is None and balance_note(examples, 1.0, 2.5) is None  # 1 and 1.2
    assert balance_note(examples[:30], 1.0, 1.0).startswith("note: all 30 rated completions are desirable")


def test_ranking_accuracy_counts_desirable_over_undesirable_pairs():
    import torch

    rewards = torch.tensor([0.5, -1.0, 0.2, 0.0, 0.3])
    desirable = torch.tensor([True, False, True, False, False])
    # desirable 0.5 beats all three undesirable (-1, 0, 0.3); 0.2 beats -1 and 0, not 0.3: 5 of 6
    assert ranking_accuracy(rewards, desirable) == pytest.approx(5 / 6)
    assert ranking_accuracy(rewards[:1], desirable[:1]) is None


# --- the worker ------------------------------------------------------------------------------------------

def step_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def test_first_step_is_half_each_weight_and_kl_zero(llama_dir, tmp_path):
    """Policy = reference at step 1: every log-ratio and z0 are 0, so each loss is w * (1 - sigmoid(0)) = w / 2;
    4 examples, 2 of each kind, weights 1 and 3: (2 x 0.5 + 2 x 1.5) / 4 = 1.0."""
    data = write_ratings(tmp_path / "ratings.jsonl", QUESTIONS[:4])
    run_json = write_run_dir(tmp_path / "run", command="kto", model=str(llama_dir), data=str(data), micro_batch=2,
                             grad_accum=2, max_steps=2, lr=1e-2, kto_undesirable_weight=3.0, precision="fp32",
                             gpus="cpu")
    train_in_process(run_json, "kto")
    first, second = step_records(tmp_path / "run")
    assert first["loss"] == pytest.approx(1.0, abs=1e-6)
    assert first["kl"] == 0.0 and first["rewards/chosen"] == first["rewards/rejected"] == 0.0
    assert {"logps/chosen", "logps/rejected", "rewards/margins", "grad_norm", "target_tokens"} <= set(first)
    assert second["loss"] < first["loss"] and second["rewards/margins"] > 0


def test_micro_batch_times_accumulation_split_gives_the_same_weights(llama_dir, tmp_path):
    """z0 is measured over the whole step before its micro-batches, and the loss is the step's mean."""
    from safetensors.torch import load_file

    data = write_ratings(tmp_path / "ratings.jsonl", QUESTIONS[:8], good_every=3)
    weights = []
    for micro, accum in [(4, 1), (1, 4)]:
        run_dir = tmp_path / f"run-{micro}x{accum}"
        run_json = write_run_dir(run_dir, command="kto", model=str(llama_dir), data=str(data), micro_batch=micro,
                                 grad_accum=accum, lr=3e-2, max_steps=2, precision="fp32", gpus="cpu", seed=3)
        train_in_process(run_json, "kto")
        weights.append(load_file(str(run_dir / "final" / "model.safetensors")))
        assert step_records(run_dir)[1]["kl"] > 0  # step 2's policy has moved: z0 took part
    for name, tensor in weights[0].items():
        assert (tensor - weights[1][name]).abs().max().item() < 1e-5, name


def test_learns_from_pairs_and_evaluates_the_ranking_of_held_out_completions(llama_dir, tmp_path):
    train = write_preferences_jsonl(tmp_path / "train.jsonl", QUESTIONS[:8])  # 16 rated completions
    held_out = write_preferences_jsonl(tmp_path / "eval.jsonl", ["hello", "what is the fox", "who is the bot"])
    run_dir = tmp_path / "run"
    run_json = write_run_dir(run_dir, command="kto", model=str(llama_dir), data=str(train), eval_data=str(held_out),
                             micro_batch=2, grad_accum=2, lr=5e-3, max_steps=8, eval_every=4, beta=0.1,
                             precision="fp32", gpus="cpu")
    train_in_process(run_json, "kto")
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    final = evals[-1]
    assert final["eval_rewards/accuracies"] == 1.0  # every held-out good reply above every bad one
    assert final["eval_rewards/margins"] > 0 and final["eval_loss"] < 0.5
    assert set(final) >= {f"eval_{name}" for name in ("loss", "kl", "rewards/chosen", "rewards/rejected",
                                                       "logps/chosen", "logps/rejected")}


@pytest.mark.slow
def test_kto_through_the_cli(gpt2_dir, tmp_path):
    """`dialogtrain kto` on ratings: the plan names the loss and its live reference, the loss falls, the
    metrics are written, the export loads."""
    from transformers import AutoModelForCausalLM

    data = write_ratings(tmp_path / "ratings.jsonl")
    run_dir = tmp_path / "run"
    repo = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([*dialogtrain_cli(), "kto", "--model", str(gpt2_dir), "--data", str(data),
                           "--output", str(run_dir), "--gpus", "cpu", "--precision", "fp32", "--micro-batch", "4",
                           "--epochs", "3", "--lr", "1e-2"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--loss kto, --beta 0.1, --kto-desirable-weight 1.0, --kto-undesirable-weight 1.0, reference live" \
        in done.stderr
    assert "-m dialogtrain.kto" in (run_dir / "command.sh").read_text()
    assert json.loads((run_dir / "run.json").read_text())["command"] == "kto"
    losses = [r["loss"] for r in step_records(run_dir)]
    assert len(losses) == 9 and losses[0] == pytest.approx(0.5, abs=1e-6) and losses[-1] < losses[0]
    assert all(math.isfinite(r["kl"]) for r in step_records(run_dir))
    assert AutoModelForCausalLM.from_pretrained(run_dir / "final") is not None


@pytest.mark.slow
def test_two_processes_under_zero3_give_the_one_process_metrics(llama_dir, tmp_path):
    """`dialogtrain kto --nproc 2 --zero 3`: z0 and the sums are all-reduced, the eval rewards gathered, so the
    losses, kl and eval metrics equal those of one process with the same global batch (5 eval completions at
    micro-batch 2: rank 1 runs an empty eval batch)."""
    data = write_ratings(tmp_path / "ratings.jsonl", QUESTIONS[:8], good_every=3)
    held_out = write_ratings(tmp_path / "eval.jsonl", ["hello", "what is the fox", "who is the bot", "good day",
                                                       "tell me a road"])
    flags = dict(model=str(llama_dir), data=str(data), eval_data=str(held_out), lr=3e-2, max_steps=3,
                 precision="fp32", gpus="cpu", seed=3)
    single = tmp_path / "single"
    train_in_process(write_run_dir(single, command="kto", micro_batch=2, grad_accum=2, **flags), "kto")
    repo = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    double = tmp_path / "double"
    done = subprocess.run([*dialogtrain_cli(), "kto", "--model", str(llama_dir), "--data", str(data), "--eval-data",
                           str(held_out), "--output", str(double), "--gpus", "cpu", "--nproc", "2", "--zero", "3",
                           "--precision", "fp32", "--micro-batch", "2", "--lr", "3e-2", "--max-steps", "3",
                           "--seed", "3"], env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = read_metrics(single / "metrics.jsonl"), read_metrics(double / "metrics.jsonl")
    assert len(one) == len(two) == 3 and any(r["kl"] > 0 for r in one)
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "kl", "rewards/chosen", "eval_loss", "eval_kl", "eval_rewards/accuracies"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=2e-5, abs=1e-5), (a["step"], key)  # 6 digits logged
