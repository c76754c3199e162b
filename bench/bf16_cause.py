"""Why DPO in pure bf16 does not learn: one precision change at a time, in a plain PyTorch DPO loop.

    python -m bench.bf16_cause [--steps 8] [--lr 5e-6] [--out DIR]

The bench workload's DPO pairs (SmolLM2-135M-Instruct, chatterbot corpus, micro-batch 8, beta 0.1,
seed 42), the same steps and learning rate for every variant; AdamW keeps an fp32 master copy of every
weight in all of them (as DeepSpeed's bf16 optimizer does), so what differs is only what the forward
pass computes with:

    fp32        fp32 weights, fp32 compute                                   (the control)
    bf16        every weight bf16 (embeddings, norms, linears, LM head): DeepSpeed's bf16 mode
    bf16-norms  bf16 linear layers, fp32 embeddings and norms (the residual stream stays fp32; each
                linear layer computes in bf16 from its bf16 weights)
    bf16-head   bf16 everywhere but the LM head (and the embedding tied to it), which computes the logits
                from fp32 weights
    autocast    fp32 weights, bf16 matmuls under torch.autocast (what TRL and the HF Trainer do)

After each optimizer step the master weights are copied into the model's weights in their dtype, so a
bf16 weight only moves once its master has drifted past half a bf16 step. Prints, per variant, the
held-out reward accuracy and margin, and the share of bf16 weights that changed at all.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

VARIANTS = ("fp32", "bf16", "bf16-norms", "bf16-head", "autocast")


def pairs_of(path: str, tokenizer) -> list[dict]:
    from dialogtrain.data.encode import encode_preferences
    from dialogtrain.data.load import load_preferences

    preferences, _ = load_preferences(path)
    return encode_preferences(tokenizer, preferences, 256)[0]


def batch_logps(model, examples: list[dict], autocast: bool) -> torch.Tensor:
    """(2B,) summed completion log-probs, chosen rows first, padded rows, log-softmax in fp32."""
    from dialogtrain.data.collate import collate_preferences
    from dialogtrain.train.losses import sequence_logps

    batch = collate_preferences(examples, pad_id=0)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
    with context:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logps(logits.float(), batch["labels"])[0]


def set_variant(model, variant: str) -> None:
    """Cast the model's weights to what `variant` computes with (the fp32 master copy is kept apart)."""
    if variant in ("fp32", "autocast"):
        return
    model.to(torch.bfloat16)
    if variant == "bf16-norms":
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding) or "Norm" in type(module).__name__:
                module.float()
    if variant == "bf16-head":
        model.get_output_embeddings().float()
        if model.config.tie_word_embeddings:
            model.get_input_embeddings().float()
    for module in model.modules() if variant != "bf16" else ():  # in an fp32 stream, a bf16 linear layer
        if isinstance(module, torch.nn.Linear) and module.weight.dtype == torch.bfloat16:  # computes in bf16
            module.register_forward_pre_hook(lambda m, args: (args[0].to(torch.bfloat16),))
            module.register_forward_hook(lambda m, args, out: out.float())


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    chosen, rejected = (policy - reference).chunk(2)
    margins = beta * (chosen - rejected)
    return -F.logsigmoid(margins).mean(), margins.detach()


def run_variant(model_dir: str, data: dict, variant: str, steps: int, lr: float, beta: float, micro: int,
                seed: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train, held = pairs_of(data["dpo_train"], tokenizer), pairs_of(data["dpo_eval"], tokenizer)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if variant == "bf16-head":  # hidden states enter the fp32 head as fp32
        head = model.get_output_embeddings()
        head.register_forward_pre_hook(lambda module, args: (args[0].float(),))
    set_variant(model, variant)
    autocast = variant == "autocast"
    with torch.no_grad():
        ref_train = [batch_logps(model, train[i:i + micro], autocast) for i in range(0, len(train), micro)]
        ref_held = [batch_logps(model, held[i:i + micro], autocast) for i in range(0, len(held), micro)]
    params = [p for p in model.parameters()]
    masters = [p.detach().float().clone().requires_grad_(True) for p in params]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(masters, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (steps - s) / steps)
    started = time.perf_counter()
    for step in range(steps):
        batch = train[(step * micro) % len(train):][:micro]
        loss, _ = dpo_loss(batch_logps(model, batch, autocast), ref_train[step % len(ref_train)], beta)
        loss.backward()
        for master, param in zip(masters, params, strict=True):
            master.grad = param.grad.float()
            param.grad = None
        torch.nn.utils.clip_grad_norm_(masters, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        with torch.no_grad():
            for master, param in zip(masters, params, strict=True):
                param.copy_(master)  # rounds to the weight's dtype
    seconds = time.perf_counter() - started
    with torch.no_grad():
        margins = torch.cat([dpo_loss(batch_logps(model, held[i:i + micro], autocast), ref, beta)[1]
                             for i, ref in zip(range(0, len(held), micro), ref_held, strict=True)])
    low = [(p, b) for p, b in zip(params, before, strict=True) if p.dtype == torch.bfloat16]
    changed = sum(int((p != b).sum()) for p, b in low) / max(1, sum(p.numel() for p, _ in low))
    return {"variant": variant, "accuracy": float((margins > 0).float().mean()), "margin": float(margins.mean()),
            "bf16_weights_changed": changed if low else math.nan, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bf16-cause"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    from bench.workload import default_model, write_workload

    torch.set_num_threads(2)
    data = write_workload(args.out / "data", 8, args.steps * 8, 32)
    model = default_model()
    results = []
    for variant in args.variants.split(","):
        result = run_variant(model, data, variant, args.steps, args.lr, 0.1, 8, 42)
        results.append(result)
        print(json.dumps(result), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
