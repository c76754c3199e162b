"""TRL's DPOTrainer on the benchmark workload, in its own process (its threads and memory apart).

    python -m bench.trl_dpo CONFIG.json RESULT.json

Its default reference (a frozen copy of the model, no ref_model given) or, with "precompute": true,
`precompute_ref_log_probs=True`: the reference log-probs of the train and held-out pairs computed in
__init__; that time is measured and reported so the caller can charge it to the throughput. Sigmoid
loss, beta, lr, steps, micro-batch, max_length, seed and precision as dialogtrain's run; TRL's
defaults otherwise. A fresh datasets cache, so no precomputed table of an earlier run is reused.
Held-out reward accuracy and margin: `trainer.evaluate()` (mean over equal-size batches = mean over pairs).
"device": "cuda" trains on the first GPU (bench.gpu_check).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.timing import peak_rss_bytes, rss_bytes, throughput, trainer_step_timer
from bench.trl_lora import peft_config


def main(config: dict) -> dict:
    cache = tempfile.mkdtemp(prefix="trl-dpo-cache-")
    os.environ["HF_DATASETS_CACHE"] = cache
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(config["threads"])
    precompute_seconds = []

    class TimedDPOTrainer(DPOTrainer):
        def _precompute_ref_logps(self, *args, **kwargs):
            started = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*args, **kwargs)
            finally:
                precompute_seconds.append(time.perf_counter() - started)

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(config["model"])
    train = load_dataset("json", data_files=config["train"], split="train", cache_dir=cache)
    held_out = load_dataset("json", data_files=config["eval"], split="train", cache_dir=cache)
    rss_before_model = rss_bytes()
    model = AutoModelForCausalLM.from_pretrained(config["model"], dtype=torch.float32)
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-dpo-"), max_steps=config["steps"],
        per_device_train_batch_size=config["micro_batch"], per_device_eval_batch_size=config["micro_batch"],
        gradient_accumulation_steps=1, learning_rate=config["lr"], lr_scheduler_type="linear", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        bf16=config["precision"] == "bf16", fp16=config["precision"] == "fp16",
        use_cpu=config.get("device", "cpu") == "cpu", seed=config["seed"], data_seed=config["seed"],
        max_length=config["max_length"], beta=config["beta"], loss_type=["sigmoid"],
        precompute_ref_log_probs=config["precompute"],
        # Off, as on our side: TRL's default gradient checkpointing trades a second forward for memory,
        # and timing it would flatter us.
        gradient_checkpointing=False,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0)
    timer = trainer_step_timer()
    trainer = TimedDPOTrainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                              peft_config=peft_config(config),  # LoRA: bench.lora's runs
                              processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    pairs = [float(config["micro_batch"])] * len(timer.seconds)
    speed = throughput(timer.seconds, pairs, config["warmup"])
    tokens = throughput(timer.seconds, timer.step_tokens(), config["warmup"])
    model_state = peak_rss_bytes() - rss_before_model
    metrics = trainer.evaluate()
    return {
        "pairs_per_s": speed["per_s"], "tokens_per_s": tokens["per_s"], "timed_steps": speed["timed_steps"],
        "step_s_median": speed["step_s_median"], "step_seconds": timer.seconds,
        "precompute_s": sum(precompute_seconds), "precomputed_pairs": len(train) + len(held_out),
        "eval_reward_accuracy": metrics["eval_rewards/accuracies"], "eval_loss": metrics["eval_loss"],
        "eval_reward_margin": metrics["eval_rewards/margins"],
        "model_state_bytes": model_state, "wall_s": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
        "gradient_checkpointing": args.gradient_checkpointing,  # off: neither side recomputes activations
    }


if __name__ == "__main__":
    result = main(json.loads(Path(sys.argv[1]).read_text()))
    Path(sys.argv[2]).write_text(json.dumps(result, indent=2) + "\n")
