"""The log-prob primitive and the SFT loss against hand-computed values."""

import math

import pytest
import torch

from dialogtrain.data.collate import learned_index
from dialogtrain.train.losses import per_sequence, sequence_logps, sft_loss, token_logps


def log_softmax(row, index):
    return row[index] - math.log(sum(math.exp(x) for x in row))


LOGITS = torch.tensor([[[1.0, 2.0, 0.0], [0.5, 0.5, 3.0], [2.0, 0.0, 1.0], [0.0, 0.0, 0.0]]])  # (1, 4, 3)
LABELS = torch.tensor([[-100, 1, -100, 2]])  # learn token 1 at position 1, token 2 at position 3


def test_token_logps_are_shifted_and_masked():
    logps, mask = token_logps(LOGITS, LABELS)
    # position t predicts label t+1: logits[0] -> label 1, logits[2] -> label 2; logits[1] -> -100
    expected = [log_softmax([1.0, 2.0, 0.0], 1), 0.0, log_softmax([2.0, 0.0, 1.0], 2)]
    assert mask.tolist() == [[True, False, True]]
    assert logps[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_sequence_logps_sums_target_tokens():
    logps, n = sequence_logps(LOGITS, LABELS)
    assert n.tolist() == [2]
    assert logps.item() == pytest.approx(log_softmax([1.0, 2.0, 0.0], 1) + log_softmax([2.0, 0.0, 1.0], 2),
                                         abs=1e-6)


def test_sft_loss_divides_by_the_step_token_count_not_the_batch():
    total = -(log_softmax([1.0, 2.0, 0.0], 1) + log_softmax([2.0, 0.0, 1.0], 2))
    batch = learned_index(LABELS)  # what the collate hands the step: positions 0 and 2 predict 1 and 2
    assert (batch["keep"].tolist(), batch["targets"].tolist()) == ([[True, False, True, False]], [1, 2])
    kept = LOGITS[batch["keep"]]  # (2, 3), as the model returns them for logits_to_keep
    assert sft_loss(kept, batch["targets"], step_target_tokens=2).item() == pytest.approx(total / 2, abs=1e-6)
    assert sft_loss(kept, batch["targets"], step_target_tokens=8).item() == pytest.approx(total / 8, abs=1e-6)


def test_per_sequence_sums_follow_the_owners():
    values = torch.tensor([1.0, 2.0, 4.0, 8.0])
    assert per_sequence(values, torch.tensor([0, 2, 2, 0]), 3).tolist() == [9.0, 0.0, 6.0]


def test_bf16_logits_are_scored_in_fp32():
    logps, _ = sequence_logps(LOGITS.bfloat16(), LABELS)
    assert logps.dtype == torch.float32


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="labels"):
        token_logps(LOGITS, LABELS[:, :3])


def test_logits_at_learned_positions_only_give_the_same_logps_and_gradients():
    """The fast path (logits computed only where a token is learned, as the loops ask the model for)
    equals the full one: values, counts and gradients."""
    from dialogtrain.train.losses import learned_positions

    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 7))
    labels[:, :3] = -100
    labels[1, 5:] = -100
    labels[2] = -100
    labels[2, 2] = 4
    keep = learned_positions(labels)
    assert keep[2].tolist() == [False, True, False, False, False, False, False]
    full, n_full = sequence_logps(logits, labels)
    fast, n_fast = sequence_logps(logits[keep], labels)
    assert torch.allclose(full, fast) and n_full.tolist() == n_fast.tolist() == [4, 2, 1]
    grad_full = torch.autograd.grad(-sequence_logps(logits, labels)[0].sum() / 7, logits)[0]
    grad_fast = torch.autograd.grad(sft_loss(logits[keep], learned_index(labels)["targets"], 7), logits)[0]
    assert torch.allclose(grad_full, grad_fast)
    with pytest.raises(ValueError, match="learned positions"):
        sequence_logps(logits[keep][:-1], labels)
