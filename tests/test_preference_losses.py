"""ORPO, SimPO and KTO against values computed by hand and against TRL's own functions on the same log-probs,
and the loss registry's facts as the launcher reads them.

Two pairs, summed log-probs and completion token counts:
    policy_chosen = [-2, -3], chosen_tokens = [2, 3]    -> mean token log-probs l_c = [-1, -1]
    policy_rejected = [-6, -1], rejected_tokens = [3, 2] -> l_r = [-2, -0.5]
"""

import math
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO and CPO (SimPO) live in trl.experimental

from dialogtrain.loss_facts import preference_losses
from dialogtrain.options import OptionsError, RunOptions
from dialogtrain.train.losses import PREFERENCE_LOSSES, kto_kl, kto_loss, log1mexp, orpo_loss, simpo_loss

POLICY_CHOSEN, CHOSEN_TOKENS = torch.tensor([-2.0, -3.0]), torch.tensor([2, 3])
POLICY_REJECTED, REJECTED_TOKENS = torch.tensor([-6.0, -1.0]), torch.tensor([3, 2])
PAIRS = (POLICY_CHOSEN, POLICY_REJECTED, CHOSEN_TOKENS, REJECTED_TOKENS)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_log1mexp_is_log_of_one_minus_exp_without_cancellation():
    x = torch.tensor([-1e-9, -0.5, -1.0, -2.0, -50.0], dtype=torch.float64)
    assert log1mexp(x).tolist() == pytest.approx([math.log(1e-9), math.log(1 - math.exp(-0.5)),
                                                  math.log(1 - math.exp(-1)), math.log(1 - math.exp(-2)),
                                                  -math.exp(-50)], rel=1e-9)


def test_orpo_is_chosen_nll_plus_lambda_times_the_log_odds_ratio_term():
    losses, chosen, rejected, nll, ratio, log_odds = orpo_loss(*PAIRS, orpo_lambda=0.5)
    # pair 0: log odds = (-1 + 2) - (log(1 - e^-1) - log(1 - e^-2)) = 1 - (-0.458675 + 0.145413) = 1.313262
    # pair 1: log odds = (-1 + 0.5) - (log(1 - e^-1) - log(1 - e^-0.5)) = -0.5 - 0.474077 = -0.974077
    assert log_odds.tolist() == pytest.approx([1.3132617, -0.9740770], abs=1e-6)
    # log sigmoid: -log(1 + e^-1.313262) = -0.238183; -log(1 + e^0.974077) = -1.294377
    assert ratio.tolist() == pytest.approx([log_sigmoid(1.3132617), log_sigmoid(-0.9740770)], abs=1e-6)
    assert ratio.tolist() == pytest.approx([-0.2381830, -1.2943769], abs=1e-6)
    # loss = -l_c - 0.5 * log sigmoid: 1 + 0.119092 = 1.119092, 1 + 0.647188 = 1.647188
    assert losses.tolist() == pytest.approx([1.1190915, 1.6471884], abs=1e-6)
    assert nll.tolist() == [1.0, 1.0]
    assert chosen.tolist() == [-0.5, -0.5] and rejected.tolist() == [-1.0, -0.25]  # lambda * l


def test_simpo_is_a_length_normalised_margin_loss():
    losses, chosen, rejected = simpo_loss(*PAIRS, beta=2.0, simpo_gamma=0.5)
    # beta (l_c - l_r) - gamma: 2 * 1 - 0.5 = 1.5 and 2 * -0.5 - 0.5 = -1.5
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-1.5)), math.log1p(math.exp(1.5))], abs=1e-6)
    assert losses.tolist() == pytest.approx([0.2014133, 1.7014133], abs=1e-6)
    assert chosen.tolist() == [-2.0, -2.0] and rejected.tolist() == [-4.0, -1.0]  # beta * l


def test_kto_weighs_desirable_and_undesirable_completions_against_the_reference_point():
    """r = policy - ref = [1, -1, 0, 2], beta 0.5, z0 = 0.5, weights 1 (desirable) and 2 (undesirable)."""
    desirable = torch.tensor([True, False, True, False])
    losses, rewards = kto_loss(torch.tensor([-3.0, -5.0, -2.0, -4.0]), torch.tensor([-4.0, -4.0, -2.0, -6.0]),
                               desirable, 0.5, beta=0.5, kto_desirable_weight=1.0, kto_undesirable_weight=2.0)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # 1 - s(0.5 (1 - 0.5)), 2 (1 - s(0.5 (0.5 + 1))), 1 - s(0.5 (0 - 0.5)), 2 (1 - s(0.5 (0.5 - 2)))
    assert losses.tolist() == pytest.approx([1 - sigmoid(0.25), 2 * (1 - sigmoid(0.75)), 1 - sigmoid(-0.25),
                                             2 * (1 - sigmoid(-0.75))], abs=1e-6)
    assert losses.tolist() == pytest.approx([0.4378235, 0.6416426, 0.5621765, 1.3583574], abs=1e-6)
    assert rewards.tolist() == [0.5, -0.5, 0.0, 1.0]


def test_kto_reference_point_is_the_clamped_mean_log_ratio_of_mismatched_pairs():
    assert kto_kl(torch.tensor([-3.0, -2.0]), torch.tensor([-4.0, -2.0])).item() == 0.5  # mean of 1 and 0
    assert kto_kl(torch.tensor([-5.0, -2.0]), torch.tensor([-4.0, -2.0])).item() == 0.0  # mean -0.5, clamped


def test_new_losses_give_per_example_gradients_and_detached_rewards():
    chosen, rejected = POLICY_CHOSEN.clone().requires_grad_(), POLICY_REJECTED.clone().requires_grad_()
    for out in (orpo_loss(chosen, rejected, CHOSEN_TOKENS, REJECTED_TOKENS, 0.1),
                simpo_loss(chosen, rejected, CHOSEN_TOKENS, REJECTED_TOKENS, 2.0, 0.5),
                kto_loss(chosen, torch.zeros(2), torch.tensor([True, False]), 0.0, 0.1)):
        losses, *rest = out
        assert losses.shape == (2,) and losses.requires_grad
        assert all(r.shape == (2,) and not r.requires_grad for r in rest)
    # SimPO: d/d(policy_chosen) = -beta / n_c * sigmoid(-(beta (l_c - l_r) - gamma))
    losses, _, _ = simpo_loss(chosen, rejected, CHOSEN_TOKENS, REJECTED_TOKENS, 2.0, 0.5)
    losses.sum().backward()
    assert chosen.grad.tolist() == pytest.approx([-2 / 2 / (1 + math.exp(1.5)), -2 / 3 / (1 + math.exp(-1.5))],
                                                 abs=1e-6)


# --- against TRL's implementations --------------------------------------------------------------------

def random_pairs(seed: int = 0, n: int = 6):
    generator = torch.Generator().manual_seed(seed)
    chosen_tokens, rejected_tokens = (torch.randint(1, 40, (n,), generator=generator) for _ in range(2))
    chosen = -torch.rand(n, generator=generator, dtype=torch.float64) * 3 * chosen_tokens
    rejected = -torch.rand(n, generator=generator, dtype=torch.float64) * 3 * rejected_tokens
    return chosen.float(), rejected.float(), chosen_tokens, rejected_tokens


def test_orpo_equals_trls_odds_ratio_loss():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    chosen, rejected, chosen_tokens, rejected_tokens = random_pairs()
    losses, chosen_rewards, rejected_rewards, nll, ratio, log_odds = orpo_loss(chosen, rejected, chosen_tokens,
                                                                               rejected_tokens, orpo_lambda=0.2)
    # TRL's ORPO: beta is the paper's lambda, on mean token log-probs; its loss is nll - mean(beta * ratio)
    trainer = SimpleNamespace(beta=0.2, accelerator=SimpleNamespace(device="cpu"))
    trl_losses, trl_chosen, trl_rejected, trl_ratio, trl_log_odds = ORPOTrainer.odds_ratio_loss(
        trainer, chosen / chosen_tokens, rejected / rejected_tokens)
    assert (losses - nll + trl_losses).abs().max().item() < 1e-6  # lambda * -log sigmoid(log odds)
    assert (chosen_rewards - trl_chosen).abs().max().item() < 1e-6
    assert (rejected_rewards - trl_rejected).abs().max().item() < 1e-6
    assert abs(ratio.mean().item() - trl_ratio.item()) < 1e-6  # TRL's log_odds_ratio metric
    assert abs(log_odds.mean().item() - trl_log_odds.item()) < 1e-6  # TRL's log_odds_chosen metric


def test_simpo_equals_trls_cpo_simpo_loss():
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    chosen, rejected, chosen_tokens, rejected_tokens = random_pairs(1)
    losses, chosen_rewards, rejected_rewards = simpo_loss(chosen, rejected, chosen_tokens, rejected_tokens,
                                                          beta=2.0, simpo_gamma=0.8)
    trainer = SimpleNamespace(alpha=0.0, loss_type="simpo", beta=2.0, simpo_gamma=0.8, label_smoothing=0.0,
                              accelerator=SimpleNamespace(device="cpu"))
    trl_losses, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(trainer, chosen / chosen_tokens,
                                                               rejected / rejected_tokens)
    assert (losses - trl_losses).abs().max().item() < 1e-6
    assert (chosen_rewards - trl_chosen).abs().max().item() < 1e-6
    assert (rejected_rewards - trl_rejected).abs().max().item() < 1e-6


class TableModel(torch.nn.Module):
    """Stands in for a model under TRL's fused LM head: row b of `input_ids` [[b, which]] gets the summed
    log-prob table[b, which] (which: 0 the completion, 1 the mismatched KL completion) as its one log-prob."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, input_ids, attention_mask=None, labels=None, fused_lm_head=True, use_cache=False):
        log_probs = self.table[input_ids[:, 0], input_ids[:, 1]][:, None]  # (B, 1)
        return SimpleNamespace(log_probs=log_probs, entropy=torch.zeros_like(log_probs),
                               mean_logits=torch.zeros_like(log_probs))


def test_kto_equals_trls_kto_trainer_loss_and_kl():
    """KTOTrainer._compute_loss itself, its reference log-probs precomputed (given in the batch), on the same
    summed log-probs of the completions and of the mismatched (KL) completions."""
    from trl import KTOTrainer

    generator = torch.Generator().manual_seed(2)
    policy = -torch.rand(6, 2, generator=generator) * 20  # (B, [completion, KL completion])
    reference = policy + torch.randn(6, 2, generator=generator)
    desirable = torch.tensor([True, False, False, True, True, False])
    beta, weights = 0.3, (1.0, 1.7)

    kl = kto_kl(policy[:, 1], reference[:, 1])
    losses, rewards = kto_loss(policy[:, 0], reference[:, 0], desirable, kl, beta, *weights)

    rows = torch.arange(6)[:, None]
    model = TableModel(policy)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x),
        precompute_ref_logps=True, calculate_KL=True, loss_type="kto", beta=beta, desirable_weight=weights[0],
        undesirable_weight=weights[1], aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    trainer._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(trainer, model, batch)
    batch = {"input_ids": torch.cat([rows, torch.zeros_like(rows)], 1), "attention_mask": torch.ones(6, 2),
             "completion_mask": torch.tensor([[0, 1]] * 6), "KL_input_ids": torch.cat([rows, torch.ones_like(rows)], 1),
             "KL_attention_mask": torch.ones(6, 2), "KL_completion_mask": torch.tensor([[0, 1]] * 6),
             "label": desirable, "ref_logps": reference[:, 0], "ref_KL_logps": reference[:, 1]}
    trl_loss = KTOTrainer._compute_loss(trainer, model, batch, return_outputs=False)
    metrics = trainer._metrics["train"]
    assert abs(losses.mean().item() - trl_loss.item()) < 1e-6
    assert abs(kl.item() - metrics["kl"][-1]) < 1e-6 and kl.item() > 0
    assert abs(rewards[desirable].mean().item() - metrics["rewards/chosen"][-1]) < 1e-6
    assert abs(rewards[~desirable].mean().item() - metrics["rewards/rejected"][-1]) < 1e-6


# --- the registry's facts, and the options they refuse -------------------------------------------------

def test_the_launcher_reads_the_same_facts_as_the_workers():
    import dataclasses

    assert list(preference_losses()) == list(PREFERENCE_LOSSES) == ["sigmoid", "ipo", "hinge", "orpo", "simpo", "kto"]
    for name, loss in PREFERENCE_LOSSES.items():
        assert preference_losses()[name] == dataclasses.replace(loss, function=None), name
    assert [name for name, loss in PREFERENCE_LOSSES.items() if not loss.reference] == ["orpo", "simpo"]
    assert [name for name, loss in PREFERENCE_LOSSES.items() if not loss.paired] == ["kto"]


def refused(command: str, **flat) -> list[str]:
    with pytest.raises(OptionsError) as error:
        RunOptions.from_flat(command, {"model": "m", "data": "d", "output": "o", **flat})
    return error.value.problems


def test_options_a_loss_does_not_read_are_refused_naming_the_flag():
    assert refused("dpo", loss="orpo", ref_model="r", precompute_ref=True, beta=0.3, simpo_gamma=1.0) == [
        "--ref-model: --loss orpo uses no reference model",
        "--beta 0.3 applies to --loss sigmoid|ipo|hinge|simpo|kto only, not --loss orpo",
        "--precompute-ref: --loss orpo uses no reference model",
        "--simpo-gamma 1.0 applies to --loss simpo only, not --loss orpo"]
    assert refused("dpo", loss="simpo", orpo_lambda=0.5, kto_desirable_weight=2.0) == [
        "--orpo-lambda 0.5 applies to --loss orpo only, not --loss simpo",
        "--kto-desirable-weight 2.0 applies to --loss kto only, not --loss simpo"]
    assert refused("kto", precompute_ref=True, rpo_alpha=1.0) == [
        "--rpo-alpha 1.0 applies to --loss sigmoid|ipo|hinge|orpo|simpo only, not --loss kto",
        "--precompute-ref: --loss kto scores new mismatched pairs with the reference every step (its KL estimate), "
        "so the reference stays live"]
    assert refused("kto", loss="sigmoid") == ["--loss sigmoid learns from chosen/rejected pairs: run `dialogtrain dpo`"]
    assert refused("kto", micro_batch=1) == [
        "`dialogtrain kto` needs a global batch (--micro-batch x --grad-accum x processes) of at least 2: its KL "
        "estimate pairs each prompt with another example's completion"]
    assert refused("dpo", loss="simpo", orpo_lambda=0.0, kto_undesirable_weight=-1.0)[:2] == [
        "--orpo-lambda must be > 0, got 0.0", "--kto-undesirable-weight must be > 0, got -1.0"]
    assert RunOptions.from_flat("kto", {"model": "m", "data": "d", "output": "o"}).dpo.loss == "kto"
    options = RunOptions.from_flat("dpo", {"model": "m", "data": "d", "output": "o", "loss": "simpo", "beta": 2.0,
                                           "simpo_gamma": 1.0, "rpo_alpha": 0.5})
    assert (options.dpo.beta, options.dpo.simpo_gamma, options.dpo.rpo_alpha) == (2.0, 1.0, 0.5)


# --- ORPO and SimPO runs: no reference model, their metrics -------------------------------------------------

@pytest.mark.parametrize("loss, settings", [("orpo", {"orpo_lambda": 0.5}), ("simpo", {"beta": 2.0, "simpo_gamma": 0.5})])
def test_reference_free_runs_load_no_reference_and_hold_one_model(loss, settings, llama_dir, tmp_path, monkeypatch):
    import dialogtrain.dpo as dpo
    import dialogtrain.train.reference as reference
    from tests.sft_harness import train_in_process, write_run_dir
    from tests.test_dpo import QUESTIONS, count_models, step_records, write_preferences_jsonl

    def no_reference(*args, **kwargs):
        raise AssertionError(f"--loss {loss} built a reference model")

    for name in ("load_reference_engine", "build_reference_engine"):  # what loads a reference model
        monkeypatch.setattr(reference, name, no_reference)
    models, real_train_step = [], dpo.train_step
    already_alive = count_models("LlamaForCausalLM")

    def counting_train_step(engine, run, state, indices):
        assert all(isinstance(side, reference.NoReference) for side in state)
        models.append(count_models("LlamaForCausalLM") - already_alive)
        return real_train_step(engine, run, state, indices)

    monkeypatch.setattr(dpo, "train_step", counting_train_step)
    data = write_preferences_jsonl(tmp_path / "prefs.jsonl", QUESTIONS[:8])
    # a step is all 8 pairs (2 x 4 accumulated), so step 1 can be computed directly from the starting model
    run_json = write_run_dir(tmp_path / "run", command="dpo", model=str(llama_dir), data=str(data), micro_batch=2,
                             grad_accum=4, max_steps=3, lr=1e-2, loss=loss, precision="fp32", gpus="cpu", **settings)
    train_in_process(run_json, "dpo")
    assert models == [1, 1, 1]  # the policy alone
    records = step_records(tmp_path / "run")
    assert records[-1]["loss"] < records[0]["loss"]
    expected = direct_step_metrics(llama_dir, data, loss, settings)
    for name, value in expected.items():
        assert records[0][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def direct_step_metrics(model_dir, data, loss: str, settings: dict) -> dict[str, float]:
    """The metrics of a step over every pair of `data`, in plain transformers (padded rows, all at once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dialogtrain.data.collate import collate_preferences
    from dialogtrain.data.encode import encode_preferences
    from dialogtrain.data.load import load_preferences
    from dialogtrain.train.losses import sequence_logps

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples, _ = encode_preferences(tokenizer, load_preferences(str(data))[0], 512)
    batch = collate_preferences(examples, tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps, n_tokens = sequence_logps(logits, batch["labels"])
    out = PREFERENCE_LOSSES[loss].function(*logps.chunk(2), *n_tokens.chunk(2), **settings)
    names = ("loss", "rewards/chosen", "rewards/rejected", *PREFERENCE_LOSSES[loss].metrics)
    return {name: value.mean().item() for name, value in zip(names, out, strict=True)}


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["orpo", "simpo"])
def test_reference_free_losses_through_the_cli(loss, gpt2_dir, tmp_path):
    """`dialogtrain dpo --loss orpo|simpo`: the plan says there is no reference, the loss falls, the metrics
    are written, and the reference options are refused."""
    import json
    import subprocess
    from pathlib import Path

    from dialogtrain.train.metrics import read_metrics
    from tests.test_dpo import dialogtrain_cli, write_orca_jsonl

    data = write_orca_jsonl(tmp_path / "orca.jsonl")
    run_dir = tmp_path / "run"
    repo = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    argv = [*dialogtrain_cli(), "dpo", "--model", str(gpt2_dir), "--data", str(data), "--output", str(run_dir),
            "--gpus", "cpu", "--precision", "fp32", "--micro-batch", "4", "--epochs", "3", "--lr", "1e-2",
            "--loss", loss, *(["--beta", "2.0"] if loss == "simpo" else [])]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"reference: none, --loss {loss} scores the policy alone" in done.stderr
    assert "reference none" in done.stderr and "frozen copy" not in done.stderr
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert len(records) == 9 and records[-1]["loss"] < records[0]["loss"]
    extra = {"nll_loss", "log_odds_ratio", "log_odds_chosen"} if loss == "orpo" else set()
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", *extra} <= set(records[0])
    assert json.loads((run_dir / "run.json").read_text())["dpo"]["loss"] == loss
    refused = subprocess.run([*argv, "--output", str(tmp_path / "other"), "--precompute-ref", "--dry-run"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert f"--precompute-ref: --loss {loss} uses no reference model" in refused.stderr
