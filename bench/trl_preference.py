"""TRL's ORPOTrainer, CPOTrainer (SimPO) or KTOTrainer on the benchmark workload, in its own process.

    python -m bench.trl_preference CONFIG.json RESULT.json        (CONFIG "method": orpo | simpo | kto)

lr, steps, micro-batch, max_length, seed and precision as dialogtrain's runs, no warm-up, linear decay,
no gradient checkpointing (TRL's default for these trainers recomputes activations; we do not); TRL's
defaults otherwise (KTO: a live reference copy, sequential sampling, desirable and undesirable weights
1). ORPO: beta = the paper's lambda; SimPO: CPOTrainer with loss_type="simpo", cpo_alpha=0 (no NLL).
Held-out accuracy: ORPO/SimPO `trainer.evaluate()`'s eval_rewards/accuracies; KTO the trained model's
ranking of held-out rated completions against the starting model (bench.preference.ranking_accuracy_of,
the code that scores ours).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.timing import throughput, trainer_step_timer


def main(config: dict) -> dict:
    cache = tempfile.mkdtemp(prefix="trl-pref-cache-")
    os.environ["HF_DATASETS_CACHE"] = cache
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(config["threads"])
    method = config["method"]
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(config["model"])
    train = load_dataset("json", data_files=config["train"], split="train", cache_dir=cache)
    held_out = load_dataset("json", data_files=config["eval"], split="train", cache_dir=cache)
    model = AutoModelForCausalLM.from_pretrained(config["model"], dtype=torch.float32)
    common = dict(
        output_dir=tempfile.mkdtemp(prefix=f"trl-{method}-"), max_steps=config["steps"],
        per_device_train_batch_size=config["micro_batch"], per_device_eval_batch_size=config["micro_batch"],
        gradient_accumulation_steps=1, learning_rate=config["lr"], lr_scheduler_type="linear", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        bf16=config["precision"] == "bf16", use_cpu=True, seed=config["seed"], data_seed=config["seed"],
        max_length=config["max_length"], gradient_checkpointing=False, logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0)
    timer = trainer_step_timer()
    kwargs = dict(train_dataset=train, eval_dataset=held_out, processing_class=tokenizer, callbacks=[timer])
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        trainer = ORPOTrainer(model=model, args=ORPOConfig(**common, beta=config["orpo_lambda"]), **kwargs)
    elif method == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(**common, loss_type="simpo", cpo_alpha=0.0, beta=config["beta"],
                         simpo_gamma=config["simpo_gamma"])
        trainer = CPOTrainer(model=model, args=args, **kwargs)
    else:
        from trl import KTOConfig, KTOTrainer

        trainer = KTOTrainer(model=model, args=KTOConfig(**common, beta=config["beta"]), **kwargs)
    trainer.train()
    speed = throughput(timer.seconds, [float(config["micro_batch"])] * len(timer.seconds), config["warmup"])
    result = {"per_s": speed["per_s"], "timed_steps": speed["timed_steps"], "step_s_median": speed["step_s_median"],
              "step_seconds": timer.seconds, "threads": torch.get_num_threads(),
              "gradient_checkpointing": common["gradient_checkpointing"]}
    if method == "kto":
        from bench.preference import ranking_accuracy_of
        from dialogtrain.train.model import load_tokenizer

        reference = AutoModelForCausalLM.from_pretrained(config["model"], dtype=torch.float32).eval()
        policy = trainer.model.float().eval()
        result["eval_reward_accuracy"] = ranking_accuracy_of(
            policy, reference, load_tokenizer(config["model"], False, None), config["eval"], config["beta"],
            config["max_length"], config["micro_batch"])
    else:
        result["eval_reward_accuracy"] = trainer.evaluate()["eval_rewards/accuracies"]
    result["wall_s"] = time.perf_counter() - started
    return result


if __name__ == "__main__":
    result = main(json.loads(Path(sys.argv[1]).read_text()))
    Path(sys.argv[2]).write_text(json.dumps(result, indent=2) + "\n")
