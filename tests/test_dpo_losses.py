"""The DPO losses against values computed by hand.

Two pairs, beta = 0.5:
    policy_chosen = [-1, -2], policy_rejected = [-3, -1], ref_chosen = ref_rejected = [-2, -2]
    chosen log-ratios   = [1, 0],  rejected log-ratios = [-1, 1]
    h = chosen - rejected log-ratio = [2, -1],  beta * h = [1, -0.5]
    rewards: chosen = beta * [1, 0] = [0.5, 0],  rejected = beta * [-1, 1] = [-0.5, 0.5]
"""

import math

import pytest
import torch

from dialogtrain.train.losses import (
    PREFERENCE_LOSSES,
    chosen_nll,
    dpo_hinge_loss,
    dpo_ipo_loss,
    dpo_rewards,
    dpo_sigmoid_loss,
)

BETA = 0.5
POLICY_CHOSEN = torch.tensor([-1.0, -2.0])
POLICY_REJECTED = torch.tensor([-3.0, -1.0])
REF_CHOSEN = torch.tensor([-2.0, -2.0])
REF_REJECTED = torch.tensor([-2.0, -2.0])
ARGS = (POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, BETA)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_sigmoid_loss_is_minus_log_sigmoid_of_beta_h():
    losses, chosen, rejected = dpo_sigmoid_loss(*ARGS)
    # -log sigmoid(1) = log(1 + e^-1) = 0.313262; -log sigmoid(-0.5) = log(1 + e^0.5) = 0.974077
    assert losses.tolist() == pytest.approx([0.3132617, 0.9740770], abs=1e-6)
    assert losses.tolist() == pytest.approx([-log_sigmoid(1.0), -log_sigmoid(-0.5)], abs=1e-6)
    assert chosen.tolist() == pytest.approx([0.5, 0.0])
    assert rejected.tolist() == pytest.approx([-0.5, 0.5])


def test_label_smoothing_is_conservative_dpo():
    eps = 0.1
    losses, _, _ = dpo_sigmoid_loss(*ARGS, label_smoothing=eps)
    # -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h):
    #   pair 0: 0.9 * 0.313262 + 0.1 * 1.313262 = 0.413262
    #   pair 1: 0.9 * 0.974077 + 0.1 * 0.474077 = 0.924077
    assert losses.tolist() == pytest.approx([0.4132617, 0.9240770], abs=1e-6)
    expected = [-(1 - eps) * log_sigmoid(x) - eps * log_sigmoid(-x) for x in (1.0, -0.5)]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)


def test_equal_policy_and_reference_give_ln2_and_zero_rewards():
    logps = torch.tensor([-4.0, -7.5, -1.25])
    for eps in (0.0, 0.2):
        losses, chosen, rejected = dpo_sigmoid_loss(logps, logps - 1, logps, logps - 1, 0.1, label_smoothing=eps)
        assert losses.tolist() == pytest.approx([math.log(2)] * 3, abs=1e-7)
        assert chosen.tolist() == rejected.tolist() == [0.0, 0.0, 0.0]


def test_ipo_loss_sequence_level():
    losses, chosen, rejected = dpo_ipo_loss(*ARGS)
    # (h - 1 / (2 beta))^2 with 1 / (2 * 0.5) = 1: (2 - 1)^2 = 1, (-1 - 1)^2 = 4
    assert losses.tolist() == pytest.approx([1.0, 4.0])
    assert chosen.tolist() == pytest.approx([0.5, 0.0]) and rejected.tolist() == pytest.approx([-0.5, 0.5])


def test_ipo_loss_per_token_as_trl():
    chosen_tokens, rejected_tokens = torch.tensor([2, 1]), torch.tensor([4, 2])
    losses, chosen, _ = dpo_ipo_loss(*ARGS, chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens)
    # h_tok = chosen log-ratio / n_c - rejected log-ratio / n_r:
    #   pair 0: 1/2 - (-1)/4 = 0.75 -> (0.75 - 1)^2 = 0.0625;  pair 1: 0/1 - 1/2 = -0.5 -> (-1.5)^2 = 2.25
    assert losses.tolist() == pytest.approx([0.0625, 2.25])
    assert chosen.tolist() == pytest.approx([0.5, 0.0])  # rewards stay sequence-level


def test_hinge_loss():
    losses, _, _ = dpo_hinge_loss(*ARGS)
    # relu(1 - beta h): relu(1 - 1) = 0, relu(1 + 0.5) = 1.5
    assert losses.tolist() == pytest.approx([0.0, 1.5])


def test_label_smoothing_is_refused_outside_sigmoid():
    for loss in (dpo_ipo_loss, dpo_hinge_loss):
        with pytest.raises(ValueError, match="sigmoid"):
            loss(*ARGS, label_smoothing=0.1)


def test_losses_are_per_example_with_gradients_and_rewards_are_detached():
    policy_chosen = POLICY_CHOSEN.clone().requires_grad_()
    policy_rejected = POLICY_REJECTED.clone().requires_grad_()
    dpo_family = {name: loss for name, loss in PREFERENCE_LOSSES.items() if loss.reference and loss.paired}
    for name, loss in dpo_family.items():
        losses, chosen, rejected = loss.function(policy_chosen, policy_rejected, REF_CHOSEN, REF_REJECTED, BETA,
                                                 chosen_tokens=torch.tensor([2, 1]), rejected_tokens=torch.tensor([4, 2]))
        assert losses.shape == (2,), name
        assert losses.requires_grad, name
        assert not chosen.requires_grad and not rejected.requires_grad, name
    assert set(dpo_family) == {"sigmoid", "ipo", "hinge"}  # orpo, simpo, kto: tests/test_preference_losses.py


def test_sigmoid_gradient_matches_the_closed_form():
    # d/d(policy_chosen) -log sigmoid(beta h) = -beta * sigmoid(-beta h)
    policy_chosen = POLICY_CHOSEN.clone().requires_grad_()
    losses, _, _ = dpo_sigmoid_loss(policy_chosen, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, BETA)
    losses.sum().backward()
    expected = [-BETA / (1 + math.exp(x)) for x in (1.0, -0.5)]
    assert policy_chosen.grad.tolist() == pytest.approx(expected, abs=1e-6)


def test_rewards_and_shape_check():
    chosen, rejected = dpo_rewards(*ARGS)
    assert chosen.tolist() == pytest.approx([0.5, 0.0]) and rejected.tolist() == pytest.approx([-0.5, 0.5])
    with pytest.raises(ValueError, match=r"\(B,\)"):
        dpo_sigmoid_loss(POLICY_CHOSEN, POLICY_REJECTED[:1], REF_CHOSEN, REF_REJECTED, BETA)


def test_chosen_nll_is_the_mean_token_nll_of_each_chosen_completion():
    # -(-1)/2 = 0.5, -(-2)/1 = 2; zero tokens counts as one
    assert chosen_nll(POLICY_CHOSEN, torch.tensor([2, 1])).tolist() == pytest.approx([0.5, 2.0])
    assert chosen_nll(torch.tensor([0.0]), torch.tensor([0])).tolist() == [0.0]
