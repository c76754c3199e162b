"""The DPO reference model: a frozen model under its own engine, or its log-probs computed once and cached.

The reference is a frozen copy of the starting policy (or --ref-model) under its own DeepSpeed
engine, or, with --precompute-ref, a table of its log-probs computed once before training, cached
in RUN/ref_logps.pt and reused while it matches; then no reference model exists during training.
With LoRA (--lora-r) and no --ref-model, the live reference is the policy itself with its adapters
disabled: the model training started from, with no second copy. A reference-free --loss (ORPO,
SimPO) has none at all.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import time
from pathlib import Path

import torch

from dialogtrain.data.collate import Collate
from dialogtrain.data.sampling import eval_micro_batches_of_rank
from dialogtrain.errors import UserError
from dialogtrain.options import RunOptions
from dialogtrain.train.attention import attend_packed, packs_sequences
from dialogtrain.train.distributed import World
from dialogtrain.train.engine import hidden_size, resolve_auto_sizes
from dialogtrain.train.forward import batch_sequence_logps
from dialogtrain.train.loop import Run, to_device
from dialogtrain.train.model import load_model, load_tokenizer, resolve_model_path

REFERENCE_CACHE = "ref_logps.pt"


class LiveReference:
    """The frozen reference model under its own DeepSpeed engine: one no-grad forward per micro-batch."""

    def __init__(self, engine):
        self.engine = engine

    @torch.no_grad()
    def logps(self, indices: list[int], batch: dict[str, torch.Tensor], policy=None) -> torch.Tensor:
        """(2B,) summed completion log-probs of the batch's rows (chosen, then rejected), fp32. Every
        reference takes the policy's engine (`policy`); only AdapterOffReference reads it."""
        return batch_sequence_logps(self.engine, batch)[0]


class AdapterOffReference:
    """The LoRA policy with its adapters (and modules to save) disabled, PEFT's disable_adapter: the model
    training started from, run by the policy's own engine. No second model, no copy of the weights."""

    def __init__(self, model: torch.nn.Module):
        self.model = model  # the PeftModel the policy's engine wraps

    @torch.no_grad()
    def logps(self, indices: list[int], batch: dict[str, torch.Tensor], policy=None) -> torch.Tensor:
        """(2B,) as LiveReference's, from `policy` (the engine) with the adapters off for this forward."""
        with self.model.disable_adapter():
            return batch_sequence_logps(policy, batch)[0]


class CachedReference:
    """Reference log-probs of every pair, looked up by pair index (--precompute-ref)."""

    def __init__(self, table: torch.Tensor):
        self.table = table  # (N, 2): chosen, rejected; fp32 on CPU

    def logps(self, indices: list[int], batch: dict[str, torch.Tensor], policy=None) -> torch.Tensor:
        rows = self.table[indices]  # (B, 2)
        return torch.cat([rows[:, 0], rows[:, 1]]).to(batch["input_ids"].device)  # (2B,) chosen, then rejected


class NoReference:
    """A reference-free --loss (ORPO, SimPO): no reference model is loaded and no log-probs computed."""

    def logps(self, indices: list[int], batch: dict[str, torch.Tensor], policy=None) -> None:
        return None


Reference = LiveReference | AdapterOffReference | CachedReference | NoReference


def setup_reference(run: Run) -> tuple[Reference, Reference]:
    """(train reference, eval reference), made once the policy's engine exists.

    A --loss that reads no reference (PREFERENCE_LOSSES' facts): NoReference, nothing loaded.
    --precompute-ref: the cached table when RUN/ref_logps.pt matches on every rank, else one pass of
    the reference over train + eval pairs (each rank its share), saved by rank 0; the reference
    model and its engine are released before returning, so training holds the policy only.
    """
    from dialogtrain.train.losses import PREFERENCE_LOSSES

    options, world = run.options, run.world
    if not PREFERENCE_LOSSES[options.dpo.loss].reference:
        world.print(f"reference: none, --loss {options.dpo.loss} scores the policy alone")
        return NoReference(), NoReference()
    if options.lora.enabled and not options.dpo.ref_model and not options.dpo.precompute_ref:
        world.print("reference: the policy with its LoRA adapters disabled (no second model)")
        reference = AdapterOffReference(run.model)
        return reference, reference
    if not options.dpo.precompute_ref:
        reference = LiveReference(load_reference_engine(options, run.tokenizer, run.collate, run.ds_config, world))
        world.print(f"reference: {options.dpo.ref_model or 'a frozen copy of --model'}, ZeRO stage "
                    f"{reference.engine.zero_optimization_stage()}, kept for the whole run")
        return reference, reference

    examples = run.train_set + run.eval_set
    fingerprint = reference_fingerprint(options, examples)
    cache = run.run_dir / REFERENCE_CACHE
    table = read_reference_cache(cache, fingerprint)
    found_everywhere = world.sum(float(table is not None))[0] == world.size
    if found_everywhere:
        world.print(f"reference log-probs: reusing {cache}")
    else:
        engine = load_reference_engine(options, run.tokenizer, run.collate, run.ds_config, world)
        started = time.perf_counter()
        table = precompute_reference_logps(LiveReference(engine), examples, options, world, run.collate)
        if world.is_main:
            tmp = cache.with_name(cache.name + ".tmp")
            torch.save({"fingerprint": fingerprint, "logps": table}, tmp)
            tmp.replace(cache)
        world.barrier()
        world.print(f"reference log-probs of {len(examples)} pairs computed in "
                    f"{time.perf_counter() - started:.3f}s, cached in {cache}")
        engine.destroy()
        del engine
        gc.collect()
    train_size = len(run.train_set)
    return CachedReference(table[:train_size]), CachedReference(table[train_size:])


def load_reference_engine(options: RunOptions, tokenizer, collate: Collate, ds_config: dict, world: World):
    """The frozen reference under its own DeepSpeed engine (eval mode, no gradients): --ref-model, or
    --model loaded again from its files (the policy's starting point, whatever the policy has become, and
    never a copy of the policy in memory: each rank reads the weights, under ZeRO-3 partitioned as they
    load; a QLoRA base is quantized as the policy's is).

    A --ref-model must share the policy's tokenizer: both score the same token ids; and, when the
    policy's batches are packed, keep packed examples apart too (checked through its engine): both
    score the same batches.
    """
    from dialogtrain.train.lora import quantization_args

    name = options.dpo.ref_model or options.model.model
    ref_tokenizer = tokenizer
    if options.dpo.ref_model:
        ref_tokenizer = load_tokenizer(name, options.model.trust_remote_code)
        if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise UserError(f"--ref-model {name}: its tokenizer differs from --model's "
                            f"{options.model.model}; both models must score the same token ids")
    packed = collate.keywords["packed"]
    reference = load_model(name, ref_tokenizer, options.model.trust_remote_code,
                           quantization_args(options, world.device), ds_config=ds_config, dtype=compute_dtype(options))
    if packed:
        attend_packed(reference)
    reference.eval()
    reference.requires_grad_(False)
    engine = build_reference_engine(reference, ds_config)
    if packed and not packs_sequences(engine):
        flag = "--ref-model" if options.dpo.ref_model else "--model"
        raise UserError(f"{flag} {name}: it lets examples packed into one row attend to each other, unlike the "
                        f"policy; run with --no-packing")
    return engine


def compute_dtype(options: RunOptions) -> torch.dtype:
    return getattr(torch, options.optim.compute_dtype)


def reference_ds_config(ds_config: dict) -> dict:
    """The policy's DeepSpeed config for a frozen model: same precision and batch sizes, no optimizer,
    scheduler or clipping. ZeRO-3 (with its parameter offload, if any) when the policy is at ZeRO-3,
    since a full replica would not fit where the policy needs sharding; stage 0 otherwise.
    """
    config = copy.deepcopy(ds_config)
    for key in ("optimizer", "scheduler", "gradient_clipping"):
        config.pop(key, None)
    zero = config.get("zero_optimization", {})
    if zero.get("stage", 0) == 3:
        zero.pop("offload_optimizer", None)
    else:
        config["zero_optimization"] = {"stage": 0}
    return config


def build_reference_engine(reference: torch.nn.Module, ds_config: dict):
    import deepspeed

    config = resolve_auto_sizes(reference_ds_config(ds_config), hidden_size(reference))
    engine, *_ = deepspeed.initialize(model=reference, config=config)
    engine.eval()
    return engine


def reference_fingerprint(options: RunOptions, examples: list[dict]) -> str:
    """sha256 of what the reference log-probs depend on: the reference model (id and, for a folder, its
    files' names, sizes and times), the precision, max_length, and every pair's ids and labels.
    """
    model = options.dpo.ref_model or options.model.model
    path = Path(resolve_model_path(model))
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file()) \
        if path.is_dir() else []
    digest = hashlib.sha256(json.dumps({"model": str(path), "files": files, "precision": options.optim.precision,
                                        "max_length": options.data.max_length}).encode())
    for example in examples:
        digest.update(json.dumps([example["chosen_ids"], example["chosen_labels"], example["rejected_ids"],
                                  example["rejected_labels"]]).encode())
    return digest.hexdigest()


def read_reference_cache(path: Path, fingerprint: str) -> torch.Tensor | None:
    """The cached (N, 2) table when `path` exists and its fingerprint matches, else None."""
    if not path.exists():
        return None
    cached = torch.load(path, map_location="cpu", weights_only=True)
    return cached["logps"] if cached.get("fingerprint") == fingerprint else None


@torch.no_grad()
def precompute_reference_logps(reference: LiveReference, examples: list[dict], options: RunOptions,
                               world: World, collate: Collate) -> torch.Tensor:
    """(N, 2) reference log-probs (chosen, rejected) of every pair, the same on every rank.

    Each rank scores its share; each entry is written by exactly one rank into a zero table, so the
    all-reduce (a sum) gathers the table exactly.
    """
    import torch.distributed as dist

    table = torch.zeros(len(examples), 2, dtype=torch.float64, device=world.device)
    for indices in eval_micro_batches_of_rank(len(examples), world.rank, world.size, options.optim.micro_batch):
        # A rank out of pairs still runs a forward (ZeRO-3 gathers are collective) and writes nothing.
        batch = to_device(collate([examples[i] for i in indices or [0]]), world.device)
        chosen, rejected = reference.logps(indices, batch).chunk(2)
        if indices:
            table[indices] = torch.stack([chosen, rejected], dim=1).double()
    if world.size > 1:
        dist.all_reduce(table)
    return table.float().cpu()
