"""The SFT worker in-process: split invariance, export equality, learning, metrics."""

from __future__ import annotations

import json

import pytest
import torch

from dialogtrain.train.metrics import read_metrics
from tests.sft_harness import train_in_process, write_messages_jsonl, write_pairs_csv, write_run_dir


def final_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.mark.parametrize("model_fixture", ["llama_dir"])
def test_micro_batch_times_accumulation_split_gives_the_same_weights(model_fixture, request, tmp_path):
    """4x1, 2x2 and 1x4 on variable-length multi-turn data: the same update, to float rounding.

    Adam's first update is lr * g / (|g| + eps): where |g| is near eps (1e-8) float rounding of g moves
    it by a few % of lr (measured 2e-5 at lr 1e-3 after one step), so lr is 1e-4.
    """
    model_dir = request.getfixturevalue(model_fixture)
    data = write_messages_jsonl(tmp_path / "chats.jsonl")
    weights = []
    for micro, accum in [(4, 1), (2, 2), (1, 4)]:
        run_dir = tmp_path / f"run-{micro}x{accum}"
        run_json = write_run_dir(run_dir, model=str(model_dir), data=str(data), micro_batch=micro,
                                 grad_accum=accum, lr=1e-4, max_steps=3, precision="fp32", gpus="cpu", seed=3)
        train_in_process(run_json)
        weights.append(final_weights(run_dir))
    start = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(model_dir / "model.safetensors"))
    for name, tensor in weights[0].items():
        assert not torch.equal(tensor, start[name]) or "norm" in name, f"{name} did not change"
        for other in weights[1:]:
            assert (tensor - other[name]).abs().max().item() < 1e-5, name


def test_export_loads_in_plain_transformers_with_the_engines_logits(gpt2_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_pairs_csv(tmp_path / "pairs.csv")
    run_dir = tmp_path / "run"
    run_json = write_run_dir(run_dir, model=str(gpt2_dir), data=str(data), micro_batch=4, max_steps=4,
                             lr=5e-3, precision="fp32", gpus="cpu")
    engine = train_in_process(run_json)
    final = run_dir / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.chat_template  # the DialoGPT template, so chat and apply_chat_template work
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # still tied
    ids = torch.tensor([tokenizer.encode("hello there how are you")])
    engine.module.eval()
    with torch.no_grad():
        expected = engine.module(input_ids=ids).logits
        got = model(input_ids=ids).logits
    assert (expected - got).abs().max().item() < 1e-6
    assert json.loads((final / "generation_config.json").read_text())["pad_token_id"] == tokenizer.eos_token_id


def test_loss_falls_and_metrics_are_logged(llama_dir, tmp_path):
    data = write_messages_jsonl(tmp_path / "chats.jsonl")
    run_dir = tmp_path / "run"
    run_json = write_run_dir(run_dir, model=str(llama_dir), data=str(data), eval_data=str(data), keep_overlap=True,
                             micro_batch=4, max_steps=12, eval_every=6, lr=1e-2, precision="fp32", gpus="cpu")
    train_in_process(run_json)
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "target_tokens"} <= set(steps[0])
    assert steps[-1]["loss"] < 0.7 * steps[0]["loss"]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [6, 12]
    assert evals[-1]["eval_ppl"] == pytest.approx(2.718281828 ** evals[-1]["eval_loss"], rel=1e-4)
    # linear decay to the end: the learning rate of the last step is 1/12 of the peak (no warm-up)
    assert steps[0]["lr"] == pytest.approx(1e-2) and steps[-1]["lr"] == pytest.approx(1e-2 / 12)


def test_eval_on_start_scores_the_base_model_as_step_0_and_changes_no_update(llama_dir, tmp_path):
    data = write_messages_jsonl(tmp_path / "chats.jsonl")
    flags = dict(model=str(llama_dir), data=str(data), eval_data=str(data), keep_overlap=True, micro_batch=4,
                 precision="fp32", gpus="cpu", seed=5)
    runs = {"start": dict(eval_on_start=True, max_steps=2, lr=1e-2), "plain": dict(max_steps=2, lr=1e-2),
            # one step too small to move a weight: its evaluation is the base model's
            "base": dict(max_steps=1, lr=1e-12)}
    records, weights = {}, {}
    for name, extra in runs.items():
        train_in_process(write_run_dir(tmp_path / name, **flags, **extra))
        records[name] = [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "eval_loss" in r]
        weights[name] = final_weights(tmp_path / name)
    first, last = records["start"]
    assert set(first) == {"step", "epoch", "eval_loss", "eval_ppl"} and first["step"] == 0
    assert first["eval_loss"] == pytest.approx(records["base"][0]["eval_loss"], rel=1e-5)
    assert last["step"] == 2 and last["eval_loss"] < first["eval_loss"] - 0.25
    assert [r["step"] for r in records["plain"]] == [2]
    for name, tensor in weights["plain"].items():  # evaluating first leaves training exactly as it was
        assert torch.equal(tensor, weights["start"][name]), name


def test_zero3_fp32_updates_the_weight_partition_in_place_and_matches_zero0(llama_dir, tmp_path):
    """ZeRO-3 in fp32 keeps one fp32 copy of each rank's partition (DeepSpeed 0.19 alone keeps two), and
    training with it gives ZeRO-0's weights."""
    data = write_messages_jsonl(tmp_path / "chats.jsonl")
    weights, engines = {}, {}
    for zero in (0, 3):
        run_dir = tmp_path / f"zero{zero}"
        run_json = write_run_dir(run_dir, model=str(llama_dir), data=str(data), micro_batch=2, zero=zero, lr=1e-4,
                                 max_steps=3, precision="fp32", gpus="cpu", seed=3)
        engines[zero] = train_in_process(run_json)
        weights[zero] = final_weights(run_dir)
    optimizer = engines[3].optimizer
    for master, partition in zip(optimizer.fp32_partitioned_groups_flat, optimizer.fp16_partitioned_groups_flat):
        assert master.data_ptr() == partition.data_ptr() and master.dtype == torch.float32
        assert optimizer.optimizer.state[master]["exp_avg"].shape == master.shape  # the optimizer stepped it
    assert weights[0].keys() == weights[3].keys()
    for name, tensor in weights[0].items():
        assert (tensor - weights[3][name]).abs().max().item() < 1e-5, name


def test_sharing_the_master_weights_skips_what_it_cannot_share():
    from types import SimpleNamespace

    from dialogtrain.train.engine import share_fp32_master_weights

    weight = torch.arange(6, dtype=torch.float32)
    clone = weight.clone().requires_grad_(True)
    assert share_fp32_master_weights(SimpleNamespace(fp32_partitioned_groups_flat=[clone],
                                                     fp16_partitioned_groups_flat=[weight])) == 24
    assert clone.data_ptr() == weight.data_ptr() and clone.requires_grad
    bf16 = weight.to(torch.bfloat16)
    master = bf16.float()
    assert share_fp32_master_weights(SimpleNamespace(fp32_partitioned_groups_flat=[master],
                                                     fp16_partitioned_groups_flat=[bf16])) == 0
    offloaded = weight.clone()
    assert share_fp32_master_weights(SimpleNamespace(fp32_partitioned_groups_flat=[offloaded], offload_optimizer=True,
                                                     fp16_partitioned_groups_flat=[weight])) == 0
    assert offloaded.data_ptr() != weight.data_ptr()
    assert share_fp32_master_weights(SimpleNamespace()) == 0  # ZeRO-0/1/2 optimizers have no such groups


def test_group_by_length_chooses_between_grouped_and_plain_shuffled_batches(llama_dir, tmp_path, monkeypatch):
    import dialogtrain.train.loop as loop
    from dialogtrain.data.sampling import step_batches

    seen = []

    def recording(num_examples, global_batch, seed, epoch, lengths=None):
        batches = step_batches(num_examples, global_batch, seed, epoch, lengths)
        seen.append((lengths is not None, batches == step_batches(num_examples, global_batch, seed, epoch)))
        return batches

    monkeypatch.setattr(loop, "step_batches", recording)
    data = write_messages_jsonl(tmp_path / "chats.jsonl")
    for group in (True, False):
        run_json = write_run_dir(tmp_path / f"group-{group}", model=str(llama_dir), data=str(data), micro_batch=2,
                                 max_steps=1, precision="fp32", gpus="cpu", seed=3, group_by_length=group)
        train_in_process(run_json)
    assert seen == [(True, False), (False, True)]  # grouped batches differ from the plain shuffle here


def test_gradient_checkpointing_trains_the_same_weights_keeping_fewer_activations(llama_dir, tmp_path):
    """--gradient-checkpointing: the same weights after 3 steps (fp32, to float rounding), and the forward
    keeps a fraction of the activation bytes for the backward pass."""
    data = write_messages_jsonl(tmp_path / "chats.jsonl")
    weights, engines = {}, {}
    for recompute in (False, True):
        run_dir = tmp_path / f"recompute-{recompute}"
        run_json = write_run_dir(run_dir, model=str(llama_dir), data=str(data), micro_batch=4, lr=1e-4, max_steps=3,
                                 precision="fp32", gpus="cpu", seed=3, gradient_checkpointing=recompute)
        engines[recompute] = train_in_process(run_json)
        weights[recompute] = final_weights(run_dir)
    for name, tensor in weights[False].items():
        assert (weights[True][name] - tensor).abs().max().item() < 1e-5, name

    def saved_bytes(model) -> int:
        kept = []

        def pack(tensor):
            kept.append(tensor.untyped_storage().nbytes())
            return tensor

        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(input_ids=torch.arange(1, 41)[None]).logits.sum()
        return sum(kept)

    assert engines[True].module.is_gradient_checkpointing and not engines[False].module.is_gradient_checkpointing
    assert saved_bytes(engines[True].module) < 0.5 * saved_bytes(engines[False].module)


def test_gradient_checkpointing_is_refused_for_a_model_without_it():
    from dialogtrain.errors import UserError
    from dialogtrain.train.model import recompute_activations

    with pytest.raises(UserError, match="--gradient-checkpointing: Linear does not support gradient checkpointing"):
        recompute_activations(torch.nn.Linear(2, 2))
