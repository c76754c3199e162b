"""The bench's "precision" group: DPO that learns in bf16 (mixed precision) against TRL's bf16, and what
mixed precision costs against bf16 weights.

    python -m bench.run --only precision [--quick]

Always bf16, whatever the bench's --precision (the point is bf16; on a CPU without AMX / AVX512-BF16 it
is emulated and slow, and the rows are still right, only late).

- Held-out reward accuracy and margin after the plan's DPO steps at its DPO lr (5e-6), live reference,
  the DPO rows' workload: ours `--precision bf16` (fp32 weights and Adam, bf16 compute under DeepSpeed's
  torch_autocast) against TRL's DPOTrainer with bf16=True (the HF Trainer's autocast, fp32 weights),
  same data, steps, lr, beta and seed. Ours in `pure-bf16` (DeepSpeed's bf16 mode: bf16 weights, an
  fp32 master copy in the optimizer) and in fp32 are reference rows: what issue 8/13 measured is that
  pure bf16 weights do not move at this lr.
- The cost of mixed precision: SFT tokens/s of ours bf16 against ours pure-bf16 (the SFT rows' runs),
  and model-state memory per rank (bench.run.memory_run: live tensor bytes at the optimizer update) at
  ZeRO-0 x1 (grad-accum 2) and ZeRO-3 x2, bf16 against pure-bf16.

What ZeRO-3 gathers under torch_autocast, read in DeepSpeed 0.19.8 (ZERO3_GATHER below, asserted by
tests/test_bench.py against the installed DeepSpeed): runtime/torch_autocast.py gives the parameters of
the modules whose class is exactly one of LOWER_PRECISION_SAFE_MODULES (nn.Linear, nn.Conv1d/2d/3d) a
`comm_dtype` of the autocast dtype; partition_parameters.py get_allgather_dtype all-gathers those in it
(bf16: half the bytes of their fp32 partitions), then casts the gathered weight back to its fp32 for
the forward (AllGatherHandle.wait), where autocast casts it to bf16 again for the matmul. Embeddings
and norms gather in fp32 (a weight tied to the LM head, an nn.Linear, gathers in bf16). The gradient
reduce-scatter of ZeRO 1-3 buckets by the same comm dtype (base_optimizer.get_param_comm_dtype), so
linear layers' gradients are averaged in bf16 too. So the gather traffic is bf16's, as in pure bf16;
the gathered weights sit in fp32 while a layer runs (4 B per parameter instead of 2).
"""

from __future__ import annotations

from bench.runner import ours_dpo, ours_sft, progress, trl, trl_config

PRECISION = "bf16"  # the rows' precision (mixed); pure-bf16 and fp32 are the references
REFERENCES = ("pure-bf16", "fp32")
ZERO3_GATHER = ("ZeRO-3 under torch_autocast (DeepSpeed 0.19.8) all-gathers nn.Linear weights in bf16 and "
                "casts them back to fp32 for the forward; embeddings and norms gather in fp32")


def measure(ctx, r: dict) -> None:
    from bench.run import memory_run  # bench.run's GROUPS imports this module

    plan, model, data, out = ctx.plan, ctx.model, ctx.data, ctx.out
    result = {}
    for precision in (PRECISION, *REFERENCES):
        progress(f"DPO, dialogtrain --precision {precision}: {plan.dpo_steps} steps")
        result[f"ours_dpo_{precision}"] = ours_dpo(model, data, plan, precision, out, False,
                                                   name=f"ours-precision-dpo-{precision}")
    progress(f"DPO, TRL bf16=True: {plan.dpo_steps} steps")
    result["trl_dpo_bf16"] = trl("trl_dpo", trl_config(
        model, plan, PRECISION, train=data["trl_dpo_train"], eval=data["trl_dpo_eval"], steps=plan.dpo_steps,
        lr=plan.dpo_lr, beta=plan.beta, precompute=False), out, "trl-precision-dpo-bf16")
    for precision in (PRECISION, "pure-bf16"):
        progress(f"SFT, dialogtrain --precision {precision}: {plan.sft_steps} steps")
        result[f"ours_sft_{precision}"] = ours_sft(model, data, plan, precision, out,
                                                   name=f"ours-precision-sft-{precision}")
        for zero, nproc, grad_accum in ((0, 1, 2), (3, 2, 1)):
            progress(f"memory: ZeRO-{zero} x{nproc}, --precision {precision}")
            result[f"memory_zero{zero}_{precision}"] = memory_run(
                model, data, plan, precision, out, zero=zero, nproc=nproc, grad_accum=grad_accum,
                name=f"precision-memory-zero{zero}-x{nproc}-{precision}")
    r["precision"] = result


def accuracy_and_margin(run: dict) -> str:
    return f"{run['eval_reward_accuracy']:.3f} (margin {run['eval_reward_margin']:.4f})"


def rows(r: dict, plan) -> list[dict]:
    from bench.table import row  # bench.table's ROWS imports this module

    p = r["precision"]
    ours, peer = p[f"ours_dpo_{PRECISION}"], p["trl_dpo_bf16"]
    one_pair = 1 / plan.dpo_held_out
    gap = ours["eval_reward_accuracy"] - peer["eval_reward_accuracy"]
    out = [row(f"held-out reward accuracy (margin) after {plan.dpo_steps} DPO steps at lr {plan.dpo_lr:g}, "
               "`--precision bf16` (fp32 weights, autocast) vs TRL bf16=True", accuracy_and_margin(ours),
               accuracy_and_margin(peer), f"{gap:+.3f}", ">= TRL - 1 pair", gap >= -one_pair - 1e-9)]
    for precision in REFERENCES:
        run = p[f"ours_dpo_{precision}"]
        out.append(row(f"held-out reward accuracy (margin), same DPO run in `--precision {precision}` "
                       "(reference)", accuracy_and_margin(run), accuracy_and_margin(peer),
                       f"{run['eval_reward_accuracy'] - peer['eval_reward_accuracy']:+.3f}", "", None))
    mixed, pure = p[f"ours_sft_{PRECISION}"]["tokens_per_s"], p["ours_sft_pure-bf16"]["tokens_per_s"]
    out.append(row("SFT tokens/s, `--precision bf16` (mixed) vs `pure-bf16` (ours both)", f"{mixed:.0f}",
                   f"{pure:.0f} (pure-bf16)", f"{mixed / pure:.2f}x", "", None))
    for zero, nproc in ((0, 1), (3, 2)):
        mixed, pure = (p[f"memory_zero{zero}_{precision}"]["model_state_bytes"] for precision in (PRECISION,
                                                                                                    "pure-bf16"))
        note = f"; {ZERO3_GATHER}" if zero == 3 else ""
        out.append(row(f"model-state memory per rank, ZeRO-{zero} x{nproc}: bf16 (mixed) vs pure-bf16{note}",
                       f"{mixed / 2**20:.0f} MiB", f"{pure / 2**20:.0f} MiB (pure-bf16)", f"{mixed / pure:.2f}x",
                       "", None))
    return out
