"""The bench's "lora" group: LoRA SFT and DPO, dialogtrain against TRL + PEFT with the same LoRA config.

    python -m bench.run --only lora [--quick]

The workload, steps, micro-batch, schedule, seed and precision of the SFT and DPO rows (bench.workload),
with LoRA of rank LORA["lora_r"] on every linear layer but the LM head, alpha 2r, no dropout, on both
sides (TRL gets PEFT's LoraConfig from the same function as dialogtrain: bench/trl_lora.py), at the
learning rates LoRA needs (SFT_LR, DPO_LR: ten times full fine-tuning's; the same on both sides).

- LoRA SFT tokens/s and LoRA DPO pairs/s: timed as the full fine-tuning rows (warm-up steps untimed);
  both sides' DPO reference is the policy with its adapters disabled.
- Model-state memory per rank of DPO, full fine-tuning (policy + its reference model) against LoRA (one
  model + adapters): bench.memory_worker around the real DPO worker, ZeRO-0, one process, the live CPU
  tensor bytes at the optimizer update (weights, gradients, Adam state; activations freed).
- Learning: held-out assistant-token loss after the LoRA SFT steps (the SFT rows' rule, both sides'
  trained models) and held-out reward accuracy after the LoRA DPO steps.
"""

from __future__ import annotations

from bench.runner import ours_dpo, ours_sft, progress, trl, trl_config

LORA = {"lora_r": 16, "lora_targets": "all-linear", "lora_dropout": 0.0}  # alpha: 2r, the default of both
SFT_LR, DPO_LR = 1e-3, 5e-5


def lora_flags() -> tuple[str, ...]:
    return ("--lora-r", str(LORA["lora_r"]), "--lora-targets", LORA["lora_targets"], "--lora-dropout",
            str(LORA["lora_dropout"]))


def measure(ctx, r: dict) -> None:
    from bench.run import memory_run  # bench.run's GROUPS imports this module

    plan, model, data, out, precision = ctx.plan, ctx.model, ctx.data, ctx.out, ctx.precision
    result = {"lora": {**LORA, "lora_alpha": 2 * LORA["lora_r"]}, "sft_lr": SFT_LR, "dpo_lr": DPO_LR}
    progress(f"LoRA SFT, dialogtrain: {plan.sft_steps} steps")
    result["ours_sft"] = ours_sft(model, data, plan, precision, out, lora_flags(), "ours-lora-sft", SFT_LR)
    progress(f"LoRA SFT, TRL + PEFT: {plan.sft_steps} steps")
    result["trl_sft"] = trl("trl_sft", trl_config(model, plan, precision, train=data["sft_train"],
                                                  eval=data["sft_eval"], steps=plan.sft_steps, lr=SFT_LR,
                                                  lora=LORA), out, "trl-lora-sft")
    progress(f"LoRA DPO, dialogtrain: {plan.dpo_steps} steps")
    result["ours_dpo"] = ours_dpo(model, data, plan, precision, out, False, lora_flags(), "ours-lora-dpo", DPO_LR)
    progress(f"LoRA DPO, TRL + PEFT: {plan.dpo_steps} steps")
    result["trl_dpo"] = trl("trl_dpo", trl_config(model, plan, precision, train=data["trl_dpo_train"],
                                                  eval=data["trl_dpo_eval"], steps=plan.dpo_steps, lr=DPO_LR,
                                                  beta=plan.beta, precompute=False, lora=LORA), out, "trl-lora-dpo")
    progress("memory: DPO model states, full fine-tuning (policy + reference) and LoRA, ZeRO-0 x1")
    result["memory_full_dpo"] = memory_run(model, data, plan, precision, out, zero=0, nproc=1, command="dpo",
                                           name="memory-dpo-full")
    result["memory_lora_dpo"] = memory_run(model, data, plan, precision, out, zero=0, nproc=1, command="dpo",
                                           flags=dict(LORA, lr=DPO_LR), name="memory-dpo-lora")
    r["lora"] = result


def rows(r: dict, plan) -> list[dict]:
    from bench.table import row  # bench.table's ROWS imports this module

    result = r["lora"]
    ours_sft, trl_sft, ours_dpo, trl_dpo = (result[k] for k in ("ours_sft", "trl_sft", "ours_dpo", "trl_dpo"))
    config = f"r {result['lora']['lora_r']}, alpha {result['lora']['lora_alpha']}, {result['lora']['lora_targets']}"
    sft_ratio = ours_sft["tokens_per_s"] / trl_sft["tokens_per_s"]
    dpo_ratio = ours_dpo["pairs_per_s"] / trl_dpo["pairs_per_s"]
    full, lora = result["memory_full_dpo"]["model_state_bytes"], result["memory_lora_dpo"]["model_state_bytes"]
    loss_ours, loss_trl = ours_sft["eval_loss"], trl_sft["eval_loss"]
    acc_ours, acc_trl = ours_dpo["eval_reward_accuracy"], trl_dpo["eval_reward_accuracy"]
    one_pair = 1 / plan.dpo_held_out
    return [
        row(f"LoRA SFT tokens/s ({config}), vs TRL + PEFT", f"{ours_sft['tokens_per_s']:.0f}",
            f"{trl_sft['tokens_per_s']:.0f}", f"{sft_ratio:.2f}x", ">= 2x", sft_ratio >= 2),
        row("LoRA DPO pairs/s (reference: adapters disabled), vs TRL + PEFT", f"{ours_dpo['pairs_per_s']:.2f}",
            f"{trl_dpo['pairs_per_s']:.2f}", f"{dpo_ratio:.2f}x", ">= 2x", dpo_ratio >= 2),
        row("DPO model-state memory per rank: full (policy + reference) -> LoRA (one model + adapters)",
            f"{full / 2**20:.0f} MiB -> {lora / 2**20:.0f} MiB", "", f"{lora / full:.2f}x", "<= 0.55x",
            lora / full <= 0.55),
        row(f"held-out assistant-token loss after {plan.sft_steps} LoRA SFT steps", f"{loss_ours:.4f}",
            f"{loss_trl:.4f}", f"{loss_ours - loss_trl:+.4f}", "<= TRL + 0.02", loss_ours <= loss_trl + 0.02),
        row(f"held-out reward accuracy after {plan.dpo_steps} LoRA DPO steps", f"{acc_ours:.3f}", f"{acc_trl:.3f}",
            f"{acc_ours - acc_trl:+.3f}", ">= TRL - 1 pair", acc_ours >= acc_trl - one_pair - 1e-9),
    ]
