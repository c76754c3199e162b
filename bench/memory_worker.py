"""The real SFT (or DPO) worker, with its memory measured: what `make bench` launches for the memory rows.

    torchrun ... -m bench.memory_worker RUN/run.json [sft|dpo]

`dialogtrain.sft.train` (or dpo's) runs unchanged; the only additions are notes of this process's memory:
- `rss_before_model`, `tensor_bytes_before_model`: RSS, and the bytes of live CPU tensors, right before
  the model is built (libraries imported, data encoded); `peak_rss_after_load`: peak RSS once it is loaded
  (bench.host_memory: what ZeRO-3's partitioned loading changes);
- `tensor_bytes_at_update`: the largest total of the live CPU tensors' storages (each storage counted
  once) at an optimizer update, after the last backward of the step and before the update. There the
  rank's model states are all live (weights, gradients, and from the second step on the optimizer
  states) with the buffers that live with them, and the activations, which ZeRO does not shard and
  which are the same on both sides, are freed. Counted from the tensors, not from RSS: glibc keeps
  freed memory, so RSS at that moment says more about the allocator's history than about what is live;
- `peak_rss_training`: peak RSS when training ends (before the export to RUN/final gathers the whole
  model on rank 0), and `peak_rss` at the end.
Each rank writes RUN/memory-rank<R>.json with these, in bytes. Counting the tensors (a walk of the
garbage collector's objects) allocates nothing big, so the peak is that of an unobserved run.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

from bench.timing import peak_rss_bytes, rss_bytes


def live_tensor_bytes() -> int:
    """Bytes of every distinct CPU tensor storage that Python objects hold, the gradients of leaf tensors
    included (autograd writes `.grad` from C++, so a gradient nobody has read has no Python object)."""
    import torch

    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            grad = obj.grad if obj.is_leaf and obj.requires_grad else None
            for tensor in (obj, grad):
                if tensor is not None and tensor.device.type == "cpu":
                    storage = tensor.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def main() -> None:
    import importlib

    import dialogtrain.train.loop as loop
    from dialogtrain.train.distributed import distributed_world

    run_json = Path(sys.argv[1])
    recipe = importlib.import_module(f"dialogtrain.{sys.argv[2] if len(sys.argv) > 2 else 'sft'}")
    notes = {"tensor_bytes_at_update": 0}
    load_model, optimizer_step, save_final = loop.load_model, recipe.optimizer_step, loop.save_final

    def load_model_noting_memory(*args, **kwargs):
        notes["rss_before_model"] = rss_bytes()
        notes["tensor_bytes_before_model"] = live_tensor_bytes()
        model = load_model(*args, **kwargs)
        notes["peak_rss_after_load"] = peak_rss_bytes()
        return model

    def optimizer_step_noting_model_states(engine):
        gc.collect()
        notes["tensor_bytes_at_update"] = max(notes["tensor_bytes_at_update"], live_tensor_bytes())
        return optimizer_step(engine)

    def save_final_noting_peak(*args, **kwargs):
        notes["peak_rss_training"] = peak_rss_bytes()
        return save_final(*args, **kwargs)

    loop.load_model, recipe.optimizer_step, loop.save_final = load_model_noting_memory, \
        optimizer_step_noting_model_states, save_final_noting_peak
    with distributed_world() as world:
        recipe.train(run_json, world)
    rank = int(os.environ.get("RANK", 0))
    (run_json.parent / f"memory-rank{rank}.json").write_text(json.dumps({**notes, "peak_rss": peak_rss_bytes()}) + "\n")


if __name__ == "__main__":
    main()
