"""Packing: a micro-batch as one row of its examples back to back, each attending only to itself.

Exact tensors of the collate, per-sequence sums with hand numbers, the model check, and the same
log-probs, gradients and trained weights as padded rows.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from dialogtrain.data.collate import collate_packed, collate_preferences, collate_sft, input_token_count
from dialogtrain.train.losses import learned_positions, sequence_logps
from tests.sft_harness import train_in_process, write_messages_jsonl, write_run_dir

EXAMPLES = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]


def test_collate_packed_puts_the_examples_back_to_back_with_their_own_positions():
    batch = collate_packed(EXAMPLES)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]  # 7 must not learn to predict 8
    assert batch["sequence_ids"].tolist() == [[0, 0, 0, 1, 1]]
    assert "attention_mask" not in batch  # the attention reads the boundaries instead
    assert batch["cu_seq_lens"].tolist() == [0, 3, 5] and batch["cu_seq_lens"].dtype == torch.int32
    assert (batch["max_length"], batch["input_tokens"], batch["num_sequences"], batch["target_tokens"]) == (3, 5, 2, 3)
    # where the losses read the logits, found on the CPU: positions 0, 1, 3 predict 6, 7 and 9
    assert (batch["keep"].tolist(), batch["targets"].tolist()) == ([0, 1, 3], [6, 7, 9])
    assert (batch["owners"].tolist(), batch["counts"].tolist()) == ([0, 0, 1], [2, 1])
    assert collate_sft(EXAMPLES, pad_id=0, packed=True).keys() == batch.keys()


def test_collate_sft_finds_the_learned_positions_of_padded_rows():
    batch = collate_sft(EXAMPLES, pad_id=0)
    assert batch["keep"].tolist() == [[True, True, False], [True, False, False]]
    assert (batch["targets"].tolist(), batch["owners"].tolist(), batch["counts"].tolist()) == ([6, 7, 9], [0, 0, 1],
                                                                                             [2, 1])
    assert (batch["input_tokens"], batch["num_sequences"]) == (5, 2)


def test_the_block_diagonal_mask_keeps_each_example_to_itself():
    from dialogtrain.train.attention import block_causal_mask

    assert block_causal_mask(torch.tensor([0, 2, 3], dtype=torch.int32), 3).int().tolist() == [
        [1, 0, 0], [1, 1, 0], [0, 0, 1]]


def test_collate_preferences_packed_keeps_chosen_first():
    pairs = [{"chosen_ids": [5, 6, 7], "chosen_labels": [-100, 6, 7], "rejected_ids": [5, 8], "rejected_labels": [-100, 8]},
             {"chosen_ids": [9, 1], "chosen_labels": [-100, 1], "rejected_ids": [9, 2, 3], "rejected_labels": [-100, 2, 3]}]
    batch = collate_preferences(pairs, pad_id=0, packed=True)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9, 1, 5, 8, 9, 2, 3]]
    assert batch["sequence_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 3, 3, 3]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 1, -100, 8, -100, 2, 3]]


def test_input_tokens_count_no_padding():
    assert input_token_count(collate_sft(EXAMPLES, pad_id=0)) == 5  # 2 x 3 positions, 1 of them padding
    assert input_token_count(collate_packed(EXAMPLES)) == 5


def log_softmax(row, index):
    return row[index] - math.log(sum(math.exp(x) for x in row))


def test_sequence_ids_split_a_packed_row_into_its_sequences():
    """Row [a0 a1 a2 | b0 b1]: a learns a1 (from a0's logits) and a2 (from a1's), b learns b1 (from b0's);
    a2's logits would predict b0, which is -100."""
    logits = torch.tensor([[[1.0, 2.0, 0.0], [0.5, 0.5, 3.0], [2.0, 0.0, 1.0], [0.0, 1.0, 0.0], [3.0, 1.0, 1.0]]])
    labels = torch.tensor([[-100, 1, 2, -100, 0]])
    sequence_ids = torch.tensor([[0, 0, 0, 1, 1]])
    expected = [log_softmax([1.0, 2.0, 0.0], 1) + log_softmax([0.5, 0.5, 3.0], 2), log_softmax([0.0, 1.0, 0.0], 0)]
    for scored in (logits, logits[learned_positions(labels)]):  # every position, or the learned ones only
        logps, n = sequence_logps(scored, labels, sequence_ids)
        assert logps.tolist() == pytest.approx(expected, abs=1e-6)
        assert n.tolist() == [2, 1]


class Bare:
    """A model as the loops call it through DeepSpeed: `engine(**inputs)` and `engine.module`."""

    def __init__(self, model):
        self.module = model

    def __call__(self, **inputs):
        return self.module(**inputs)


def encoded(model_dir, max_length=64):
    from dialogtrain.data.encode import encode_conversations
    from dialogtrain.data.load import load_conversations
    from dialogtrain.train.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), tokenizer)
    conversations, _ = load_conversations(str(write_messages_jsonl(model_dir.parent / "packing.jsonl")))
    return model.eval(), tokenizer, encode_conversations(tokenizer, conversations, max_length)[0]


@pytest.mark.parametrize("model_fixture", ["gpt2_dir", "llama_dir"])
def test_packed_rows_give_the_padded_log_probs_and_gradients(model_fixture, request, monkeypatch):
    """Under transformers' sdpa (which reads the packing from the restarting positions) and under
    packed_attention's CPU path (SDPA per example) and its block-diagonal-mask path (the GPU's for fp32)."""
    import dialogtrain.train.attention as attention
    from dialogtrain.train.forward import batch_sequence_logps

    model, tokenizer, examples = encoded(request.getfixturevalue(model_fixture))
    assert len({len(e["input_ids"]) for e in examples}) > 2  # padded rows really are padded

    def scored(packed):
        model.zero_grad()
        logps, n = batch_sequence_logps(Bare(model), collate_sft(examples, tokenizer.pad_token_id, packed=packed))
        logps.sum().backward()
        return logps.detach(), n, {name: p.grad.clone() for name, p in model.named_parameters()}

    padded, n_padded, grads_padded = scored(packed=False)
    assert model.config._attn_implementation == "sdpa"
    for path in ("sdpa", attention.PER_EXAMPLE, attention.BLOCK_MASK):
        if path == attention.PER_EXAMPLE:
            assert attention.attend_packed(model) == "sdpa" and model.config._attn_implementation == attention.PACKED
        if path != "sdpa":
            monkeypatch.setattr(attention, "attention_path", lambda device, dtype, dropout=0.0, path=path: path)
        assert attention.packs_sequences(model)
        packed, n_packed, grads_packed = scored(packed=True)
        assert n_packed.tolist() == n_padded.tolist() and len(n_packed) == len(examples)
        assert (packed - padded).abs().max().item() < 1e-4, path
        for name, grad in grads_padded.items():
            assert (grads_packed[name] - grad).abs().max().item() <= 1e-4 * max(1.0, grad.abs().max().item()), name


def test_the_attention_path_follows_the_device_and_dtype():
    from dialogtrain.train import attention

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert attention.attention_path(cpu, torch.bfloat16) == attention.PER_EXAMPLE
    assert attention.attention_path(cuda, torch.bfloat16) == attention.VARLEN  # torch 2.13 has varlen_attn
    assert attention.attention_path(cuda, torch.float16) == attention.VARLEN
    assert attention.attention_path(cuda, torch.float32) == attention.BLOCK_MASK  # flash kernels are 16-bit
    assert attention.attention_path(cuda, torch.bfloat16, dropout=0.1) == attention.BLOCK_MASK


def test_packed_attention_is_not_saved_with_the_model(llama_dir, tmp_path):
    from dialogtrain.train.attention import attend_packed
    from dialogtrain.train.model import load_model, load_tokenizer

    model = load_model(str(llama_dir), load_tokenizer(str(llama_dir)))
    assert attend_packed(model) == "sdpa"
    model.save_pretrained(tmp_path / "saved")
    assert "dialogtrain" not in (tmp_path / "saved" / "config.json").read_text()


class AttendsAcross(torch.nn.Module):
    """A causal LM that takes position ids but attends across packed examples (a full attention mask)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, input_ids, position_ids=None, attention_mask=None, **boundaries):
        return self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=torch.ones_like(input_ids))


class NoPositions(AttendsAcross):
    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def test_a_model_that_mixes_packed_examples_is_padded_instead(llama_dir):
    from dialogtrain.data.collate import choose_collate
    from dialogtrain.train.attention import packs_sequences
    from dialogtrain.train.model import load_model, load_tokenizer

    model = load_model(str(llama_dir), load_tokenizer(str(llama_dir)))
    model.train()
    assert packs_sequences(model) and model.training  # the check leaves the mode as it was
    said = []
    for wrapped in (AttendsAcross(model), NoPositions(model)):
        assert not packs_sequences(wrapped)
        collate = choose_collate(collate_sft, True, wrapped, 0, said.append)
        assert collate.keywords == {"pad_id": 0, "packed": False}
    assert said == ["packing: off, this model lets examples packed into one row attend to each other; "
                    "padding instead"] * 2
    assert choose_collate(collate_sft, False, model, 0, said.append).keywords["packed"] is False
    assert choose_collate(collate_sft, True, model, 0, said.append).keywords["packed"] is True
    assert said[2:] == ["packing: each micro-batch is one row of its examples; attention: the model's own (sdpa), "
                        "which reads the packing from the restarting positions"]


def final_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def step_records(run_dir):
    from dialogtrain.train.metrics import read_metrics

    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize("command", ["sft", "dpo"])
def test_packing_trains_the_weights_padding_trains(command, llama_dir, tmp_path):
    """Three steps of 4 examples (SFT) or 2 pairs (DPO, live reference), fp32: the same losses, token
    counts and weights either way, to float rounding."""
    if command == "sft":
        data = write_messages_jsonl(tmp_path / "chats.jsonl")
        micro = 4
    else:
        from tests.test_dpo import write_preferences_jsonl

        data = write_preferences_jsonl(tmp_path / "prefs.jsonl")
        micro = 2
    runs = {}
    for packing in (True, False):
        run_dir = tmp_path / f"packing-{packing}"
        run_json = write_run_dir(run_dir, command=command, model=str(llama_dir), data=str(data), micro_batch=micro,
                                 lr=1e-4, max_steps=3, precision="fp32", gpus="cpu", seed=3, packing=packing)
        train_in_process(run_json, command)
        runs[packing] = (step_records(run_dir), final_weights(run_dir))
    (packed_steps, packed_weights), (padded_steps, padded_weights) = runs[True], runs[False]
    for packed, padded in zip(packed_steps, padded_steps, strict=True):
        assert packed["loss"] == pytest.approx(padded["loss"], abs=1e-5)
        assert (packed["input_tokens"], packed["target_tokens"]) == (padded["input_tokens"], padded["target_tokens"])
    for name, tensor in padded_weights.items():
        assert (packed_weights[name] - tensor).abs().max().item() < 1e-5, name


def test_a_ref_model_that_mixes_packed_examples_is_refused(llama_dir, monkeypatch):
    """Checked through the reference's own engine; padded runs need no check."""
    import dialogtrain.train.reference as reference
    from dialogtrain.errors import UserError
    from dialogtrain.options import RunOptions
    from dialogtrain.train.distributed import distributed_world
    from dialogtrain.train.model import load_tokenizer
    from launcher.ds_config import build_ds_config
    from tests.sft_harness import single_process_env

    tokenizer = load_tokenizer(str(llama_dir))
    options = RunOptions.from_flat("dpo", {"model": str(llama_dir), "ref_model": str(llama_dir), "data": "d",
                                           "output": "o", "precision": "fp32"})
    ds_config = build_ds_config(options, {}, device="cpu")
    monkeypatch.setattr(reference, "packs_sequences", lambda engine: False)
    packed = functools.partial(collate_preferences, pad_id=0, packed=True)
    padded = functools.partial(collate_preferences, pad_id=0, packed=False)
    with single_process_env(), distributed_world() as world:
        with pytest.raises(UserError, match="--ref-model .*attend to each other, unlike the policy; run with "
                                            "--no-packing"):
            reference.load_reference_engine(options, tokenizer, packed, ds_config, world)
        engine = reference.load_reference_engine(options, tokenizer, padded, ds_config, world)
        assert not engine.module.training and not any(p.requires_grad for p in engine.module.parameters())
