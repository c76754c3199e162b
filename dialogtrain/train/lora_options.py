"""The LoRA section of the run options (`--lora-r`, `--lora-alpha`, ...): its fields, defaults and checks.
Torch-free, like the other sections in dialogtrain.options; dialogtrain.train.lora applies it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dialogtrain.option_fields import flag, option

if TYPE_CHECKING:
    from dialogtrain.options import OptimOptions

LORA_DEFAULT_TARGETS = "all-linear"


@dataclass(frozen=True)
class LoraOptions:
    lora_r: int = option(0, "LoRA rank R: train low-rank adapters (PEFT) on a frozen model instead of all its "
                         "weights; 0 trains all weights (full fine-tuning)", "R")
    lora_alpha: float | None = option(None, "LoRA scale numerator: an adapter adds (alpha / R) x B A to its "
                                      "weight  [default: 2 x --lora-r]", "A")
    lora_dropout: float = option(0.0, "dropout on the adapters' input (DPO turns all dropout off)")
    lora_targets: str = option(LORA_DEFAULT_TARGETS, "the modules that get adapters: all-linear (every linear "
                               "layer but the LM head) or NAME,... (module names or name endings, e.g. "
                               "q_proj,v_proj)", "all-linear|NAME,...")
    lora_modules_to_save: str | None = option(None, "modules trained in full beside the adapters and saved with "
                                              "them, e.g. embed_tokens,lm_head when tokens were added", "NAME,...")
    use_dora: bool = option(False, "DoRA: each adapted weight also learns its per-output magnitude")
    load_in_4bit: bool = option(False, "QLoRA: hold the frozen base in 4 bits (NF4, double quantization, "
                                "bitsandbytes), compute in --precision; ZeRO 0-2 only")

    @property
    def enabled(self) -> bool:
        return self.lora_r > 0

    @property
    def alpha(self) -> float:
        """--lora-alpha, or 2R when not given."""
        return self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_r

    def problems(self) -> list[str]:
        out = []
        if self.lora_r < 0:
            out.append(f"{flag('lora_r')} must be >= 0 (0: full fine-tuning), got {self.lora_r}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            out.append(f"{flag('lora_alpha')} must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            out.append(f"{flag('lora_dropout')} must be in [0, 1), got {self.lora_dropout}")
        for name in ("lora_targets", "lora_modules_to_save"):
            names = getattr(self, name)
            if names not in (None, LORA_DEFAULT_TARGETS) and not all(part.strip().replace(".", "").replace("_", "").isalnum()
                                              for part in names.split(",")):
                out.append(f"{flag(name)} {names!r}: expected NAME,NAME,... (module names: letters, digits, "
                           f"_ and .)")
        if self.lora_r == 0:
            given = [name for name in ("lora_alpha", "lora_modules_to_save", "use_dora", "load_in_4bit")
                     if getattr(self, name)]
            given += [name for name, default in (("lora_dropout", 0.0), ("lora_targets", LORA_DEFAULT_TARGETS))
                      if getattr(self, name) != default]
            out += [f"{flag(name)} needs {flag('lora_r')} R > 0 (LoRA); without it all weights train"
                    for name in given]
        return out

    def problems_with(self, optim: OptimOptions) -> list[str]:
        """The combinations with the optimisation options that cannot run."""
        if self.load_in_4bit and optim.zero == 3:
            return [f"{flag('load_in_4bit')} works with {flag('zero')} 0, 1 or 2: ZeRO-3 partitions every weight "
                    f"across processes, and 4-bit quantized weights (packed bytes with their own scales) cannot "
                    f"be partitioned"]
        return []
