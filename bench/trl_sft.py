"""TRL's SFTTrainer on the benchmark workload, in its own process (its threads and memory apart).

    python -m bench.trl_sft CONFIG.json RESULT.json

Assistant-only loss (`assistant_only_loss=True`) with bench.workload's marked copy of the model's
chat template, checked to render every training conversation exactly as the model's own, so TRL
learns the same tokens as dialogtrain; otherwise TRL's defaults (no length grouping, no packing,
its chunked log-prob LM head). The same lr, steps, micro-batch, max_length, seed, precision and linear
decay without warm-up as dialogtrain. bf16 is TRL's usual mixed precision (autocast, fp32 weights).
Config "packing": true is TRL at its best layout instead (bench.trl_packed): `packing=True,
packing_strategy="bfd"`, micro-batch rows of max_length tokens (padding-free). "device": "cuda" trains
on the first GPU (bench.gpu_check).

After training, the held-out assistant-token loss is computed by the same rule as dialogtrain's
evaluation (summed token NLL over all held-out target tokens / their count), on the same encoding.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from bench.timing import peak_rss_bytes, rss_bytes, throughput, trainer_step_timer
from bench.trl_lora import peft_config


def held_out_loss(model, tokenizer, eval_path: str, max_length: int, micro_batch: int, precision: str) -> float:
    """Mean assistant-token NLL of the held-out conversations, as dialogtrain.sft.evaluate computes it."""
    import torch

    from dialogtrain.data.collate import collate_sft
    from dialogtrain.data.encode import encode_conversations
    from dialogtrain.data.load import load_conversations
    from dialogtrain.train.losses import sequence_logps

    conversations, _ = load_conversations(eval_path)
    examples, _ = encode_conversations(tokenizer, conversations, max_length)
    model.eval()
    nll, tokens = 0.0, 0
    device = next(model.parameters()).device
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.no_grad(), torch.autocast(device.type, dtype=half or torch.bfloat16, enabled=half is not None):
        for start in range(0, len(examples), micro_batch):
            batch = collate_sft(examples[start:start + micro_batch], tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
            logps, n = sequence_logps(logits, batch["labels"].to(device))
            nll -= float(logps.sum())
            tokens += int(n.sum())
    return nll / max(tokens, 1)


def main(config: dict) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from bench.workload import check_same_rendering, training_template_for

    torch.set_num_threads(config["threads"])
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(config["model"])
    train = load_dataset("json", data_files=config["train"], split="train")
    template = training_template_for(tokenizer)
    check_same_rendering(tokenizer, template, train["messages"][:200])
    rss_before_model = rss_bytes()
    model = AutoModelForCausalLM.from_pretrained(config["model"], dtype=torch.float32)
    tokenizer.chat_template = template
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-sft-"), max_steps=config["steps"],
        per_device_train_batch_size=config["micro_batch"], gradient_accumulation_steps=1,
        learning_rate=config["lr"], lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        bf16=config["precision"] == "bf16", fp16=config["precision"] == "fp16",
        use_cpu=config.get("device", "cpu") == "cpu", seed=config["seed"], data_seed=config["seed"],
        max_length=config["max_length"], assistant_only_loss=True,
        packing=config.get("packing", False), packing_strategy="bfd",
        # Off, as on our side: TRL's default gradient checkpointing trades a second forward for memory,
        # and timing it would flatter us.
        gradient_checkpointing=False,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0)
    timer = trainer_step_timer()
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                         callbacks=[timer], peft_config=peft_config(config))  # LoRA: bench.lora's runs
    trainer.train()
    speed = throughput(timer.seconds, timer.step_tokens(), config["warmup"])
    parameters = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {
        "tokens_per_s": speed["per_s"], "timed_steps": speed["timed_steps"], "step_s_median": speed["step_s_median"],
        "step_seconds": timer.seconds, "step_tokens": timer.step_tokens(), "parameters": parameters,
        "eval_loss": held_out_loss(trainer.model, tokenizer, config["eval"], config["max_length"],
                                   config["micro_batch"], config["precision"]),
        "model_state_bytes": peak_rss_bytes() - rss_before_model, "wall_s": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
        "gradient_checkpointing": args.gradient_checkpointing,  # off: neither side recomputes activations
    }


if __name__ == "__main__":
    result = main(json.loads(Path(sys.argv[1]).read_text()))
    Path(sys.argv[2]).write_text(json.dumps(result, indent=2) + "\n")
