"""MFU's numerator: training FLOPs per token, counted from the parameters that exist and the ones that train."""

import torch

from dialogtrain.train.mfu import mfu, train_flops_per_token


def test_a_trained_parameter_costs_six_flops_a_token_and_a_frozen_one_four():
    model = torch.nn.Sequential(torch.nn.Linear(10, 20, bias=False), torch.nn.Linear(20, 5, bias=False))
    assert train_flops_per_token(model) == 6 * (200 + 100)
    model[0].requires_grad_(False)  # LoRA's base: activations' gradients, no weight gradient
    assert train_flops_per_token(model) == 4 * 200 + 6 * 100


def test_tied_weights_count_once():
    embedding = torch.nn.Embedding(7, 3)
    head = torch.nn.Linear(3, 7, bias=False)
    head.weight = embedding.weight
    assert train_flops_per_token(torch.nn.ModuleList([embedding, head])) == 6 * 21


def test_mfu_is_the_share_of_the_peak():
    assert mfu(600, 1000, 1.2e6) == 0.5
