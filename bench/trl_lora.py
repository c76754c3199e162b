"""TRL + PEFT for the bench's "lora" group: the LoRA config bench/trl_sft.py and bench/trl_dpo.py give their
trainer (`peft_config=`), built by the same function as dialogtrain's, so both sides adapt the same layers
with the same rank, alpha and dropout. TRL's DPOTrainer then scores the reference with the adapters
disabled, as dialogtrain does."""

from __future__ import annotations


def peft_config(config: dict):
    """PEFT's LoraConfig of a TRL run's `config["lora"]` (dialogtrain's --lora-* options by field name), or
    None without one (full fine-tuning)."""
    if not config.get("lora"):
        return None
    from dialogtrain.options import LoraOptions
    from dialogtrain.train.lora import lora_config

    return lora_config(LoraOptions(**config["lora"]))
