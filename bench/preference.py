"""The bench's "preference" group: ORPO, SimPO and KTO, dialogtrain against TRL on the DPO workload.

    python -m bench.run --only preference [--quick]

Same data, steps, micro-batch, lr, schedule, seed and precision on both sides as the DPO rows
(bench.workload's pairs; KTO's rated completions are those pairs split into one desirable and one
undesirable completion each, shuffled with the seed so that consecutive rows mix prompts: TRL pairs
each example with its neighbour for the KL estimate, we with the next of the step).

- ORPO and SimPO pairs/s: ours (`dialogtrain dpo --loss orpo|simpo`, no reference model) against our
  live-reference DPO measured in the same group, and against TRL's ORPOTrainer and CPOTrainer
  (loss_type="simpo", cpo_alpha=0), timed as bench.run's DPO rows are (warm-up steps untimed).
- KTO rated completions/s: `dialogtrain kto` against TRL's KTOTrainer (default: a live reference copy).
- Held-out reward accuracy: ORPO/SimPO, the share of held-out pairs whose chosen reward beats the
  rejected one (ours eval_rewards/accuracies, TRL's trainer.evaluate()); KTO, the share of (desirable,
  undesirable) held-out completions whose log-ratio against the starting model is in the right order,
  computed by `ranking_accuracy_of` below for both sides' trained models (the same code, fp32).
Each TRL run is bench/trl_preference.py in its own process.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from bench.runner import (
    common_flags,
    dialogtrain_command,
    progress,
    run_checked,
    train_records,
    trl,
    trl_config,
)
from bench.timing import throughput

# SimPO's scale and margin: the paper's range (beta about 2, gamma / beta about 0.5), the same on both sides.
SIMPO_BETA, SIMPO_GAMMA = 2.0, 1.0
ORPO_LAMBDA = 0.1  # TRL's ORPOConfig default beta (the paper's lambda)


def rating_rows(pairs_file: str, seed: int) -> list[dict]:
    """TRL's conversational KTO rows from TRL's pair rows: each pair gives its chosen (label true) and its
    rejected (label false), shuffled with `seed`."""
    rows = []
    for line in Path(pairs_file).read_text().splitlines():
        pair = json.loads(line)
        rows += [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
                 {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}]
    random.Random(seed).shuffle(rows)
    return rows


def write_rating_files(data: dict, out: Path, seed: int) -> dict:
    files = {}
    for name, pairs in (("kto_train", data["trl_dpo_train"]), ("kto_eval", data["trl_dpo_eval"])):
        path = out / "data" / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rating_rows(pairs, seed)))
        files[name] = str(path)
    return files


def ours(command: str, name: str, model: str, train: str, held_out: str, plan, precision: str, out: Path,
         extra: list[str]) -> dict:
    """One of our runs through the CLI: units (pairs or rated completions) per second, held-out accuracy."""
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_checked([*dialogtrain_command(), command, "--model", model, "--data", train, "--eval-data", held_out,
                 "--output", str(run_dir), *extra, *common_flags(plan, precision, plan.dpo_steps, plan.dpo_lr)],
                out / "logs" / f"{name}.log")
    records = train_records(run_dir)
    seconds = [r["input_tokens"] / r["tokens_per_s"] for r in records]
    speed = throughput(seconds, [plan.micro_batch] * len(records), plan.warmup)
    evals = [r for r in records if "eval_rewards/accuracies" in r]
    return {"per_s": speed["per_s"], "timed_steps": speed["timed_steps"], "step_s_median": speed["step_s_median"],
            "eval_reward_accuracy": evals[-1]["eval_rewards/accuracies"], "run_dir": str(run_dir)}


def ranking_accuracy_of(policy, reference, tokenizer, ratings_file: str, beta: float, max_length: int,
                        micro_batch: int) -> float:
    """The share of (desirable, undesirable) pairs of the held-out rated completions whose rewards
    beta * (log policy - log reference) are in the right order (dialogtrain.kto.ranking_accuracy), fp32."""
    import torch

    from dialogtrain.data.collate import collate_sft
    from dialogtrain.data.encode import encode_ratings
    from dialogtrain.data.load import load_ratings
    from dialogtrain.kto import ranking_accuracy
    from dialogtrain.train.losses import sequence_logps

    examples, _ = encode_ratings(tokenizer, load_ratings(ratings_file)[0], max_length)
    rewards = []
    with torch.no_grad():
        for start in range(0, len(examples), micro_batch):
            batch = collate_sft(examples[start:start + micro_batch], tokenizer.pad_token_id)
            logps = [sequence_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                                          ).logits.float(), batch["labels"])[0] for model in (policy, reference)]
            rewards += (beta * (logps[0] - logps[1])).tolist()
    return ranking_accuracy(torch.tensor(rewards), torch.tensor([e["desirable"] for e in examples]))


def our_kto_accuracy(run_dir: str, model: str, ratings_file: str, plan) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from dialogtrain.train.model import load_tokenizer

    tokenizer = load_tokenizer(model, False, None)
    policy, reference = (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
                         for path in (Path(run_dir) / "final", model))
    return ranking_accuracy_of(policy, reference, tokenizer, ratings_file, plan.beta, plan.max_length,
                               plan.micro_batch)


def measure(ctx, r: dict) -> None:
    plan, model, data, out, precision = ctx.plan, ctx.model, ctx.data, ctx.out, ctx.precision
    files = write_rating_files(data, out, plan.seed)
    runs = {"dpo": ("dpo", ["--beta", str(plan.beta)]),
            "orpo": ("dpo", ["--loss", "orpo", "--orpo-lambda", str(ORPO_LAMBDA)]),
            "simpo": ("dpo", ["--loss", "simpo", "--beta", str(SIMPO_BETA), "--simpo-gamma", str(SIMPO_GAMMA)]),
            "kto": ("kto", ["--beta", str(plan.beta)])}
    result = {}
    for name, (command, extra) in runs.items():
        train, held_out = (files["kto_train"], files["kto_eval"]) if name == "kto" else (data["dpo_train"],
                                                                                          data["dpo_eval"])
        progress(f"{name.upper()}, dialogtrain: {plan.dpo_steps} steps")
        result[f"ours_{name}"] = ours(command, f"ours-pref-{name}", model, train, held_out, plan, precision, out, extra)
        if name == "dpo":
            continue
        progress(f"{name.upper()}, TRL: {plan.dpo_steps} steps")
        config = trl_config(model, plan, precision, method=name, steps=plan.dpo_steps, lr=plan.dpo_lr,
                            train=files["kto_train"] if name == "kto" else data["trl_dpo_train"],
                            eval=files["kto_eval"] if name == "kto" else data["trl_dpo_eval"],
                            beta=SIMPO_BETA if name == "simpo" else plan.beta, simpo_gamma=SIMPO_GAMMA,
                            orpo_lambda=ORPO_LAMBDA)
        result[f"trl_{name}"] = trl("trl_preference", config, out, f"trl-{name}")
    result["ours_kto"]["logged_eval_reward_accuracy"] = result["ours_kto"]["eval_reward_accuracy"]
    result["ours_kto"]["eval_reward_accuracy"] = our_kto_accuracy(result["ours_kto"]["run_dir"], model,
                                                                  files["kto_eval"], plan)
    r["preference"] = result


def rows(r: dict, plan) -> list[dict]:
    from bench.table import row  # bench.table's ROWS imports this module

    p = r["preference"]
    one_pair = 1 / plan.dpo_held_out
    out = []
    for name, label in (("orpo", "ORPO"), ("simpo", "SimPO")):
        ours_, trl_ = p[f"ours_{name}"], p[f"trl_{name}"]
        vs_dpo, vs_trl = ours_["per_s"] / p["ours_dpo"]["per_s"], ours_["per_s"] / trl_["per_s"]
        acc_ours, acc_trl = ours_["eval_reward_accuracy"], trl_["eval_reward_accuracy"]
        out += [row(f"{label} pairs/s vs our live-reference DPO (no reference model)", f"{ours_['per_s']:.2f}",
                    f"{p['ours_dpo']['per_s']:.2f} (ours, DPO)", f"{vs_dpo:.2f}x", "~1.5-2x", None),
                row(f"{label} pairs/s vs TRL", f"{ours_['per_s']:.2f}", f"{trl_['per_s']:.2f}", f"{vs_trl:.2f}x",
                    ">= 2x", vs_trl >= 2),
                row(f"held-out reward accuracy after {plan.dpo_steps} {label} steps", f"{acc_ours:.3f}",
                    f"{acc_trl:.3f}", f"{acc_ours - acc_trl:+.3f}", ">= TRL - 1 pair",
                    acc_ours >= acc_trl - one_pair - 1e-9)]
    ours_, trl_ = p["ours_kto"], p["trl_kto"]
    ratio = ours_["per_s"] / trl_["per_s"]
    acc_ours, acc_trl = ours_["eval_reward_accuracy"], trl_["eval_reward_accuracy"]
    out += [row("KTO rated completions/s vs TRL's KTOTrainer", f"{ours_['per_s']:.2f}", f"{trl_['per_s']:.2f}",
                f"{ratio:.2f}x", ">= 2x", ratio >= 2),
            row(f"held-out desirable-above-undesirable share after {plan.dpo_steps} KTO steps", f"{acc_ours:.3f}",
                f"{acc_trl:.3f}", f"{acc_ours - acc_trl:+.3f}", ">= TRL - 0.01", acc_ours >= acc_trl - 0.01)]
    return out
