"""How often a training step reads a value back from the device: on a GPU every read stalls the queue.

Counted on the CPU, where the same operations run: scalar reads (`.item()`, `float(x)`, `int(x)`,
`bool(x)`: aten._local_scalar_dense), `.tolist()`, data-dependent shapes (aten.nonzero, masked_select,
boolean-mask indexing, unique, bincount). Not counted, because on a GPU they read host memory: the
collate (it builds the batch on the CPU before it moves; run here outside the count) and torch's
optimizers reading their step counters (CPU tensors unless fused or capturable). The budget
(train.loop and the recipes): no read in a micro-batch's forward and backward, a few per optimizer
step (the loss and metrics, the gradient norm).
"""

from __future__ import annotations

import collections
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from tests.sft_harness import single_process_env, write_pairs_csv, write_run_dir

SYNCING = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
           "aten.unique_consecutive.default", "aten._unique2.default", "aten.bincount.default",
           "aten.repeat_interleave.Tensor"}


class CountReads(TorchDispatchMode):
    """Counts the operations that would make the host wait for the device."""

    def __init__(self):
        super().__init__()
        self.reads: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        bool_index = name.startswith("aten.index.Tensor") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or [])
        if (name in SYNCING or bool_index) and not from_optimizer_step_counters():
            self.reads[name] += 1
        return func(*args, **(kwargs or {}))


def from_optimizer_step_counters() -> bool:
    return any("torch/optim/" in frame.filename for frame in traceback.extract_stack())


@pytest.fixture
def counted(monkeypatch):
    """A CountReads that also sees .tolist() (which reads without dispatching an aten op)."""
    mode = CountReads()
    real = torch.Tensor.tolist

    def tolist(self):
        mode.reads["tolist"] += 1
        return real(self)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    return mode


@pytest.mark.parametrize("command", ["sft", "dpo"])
def test_a_training_step_reads_the_device_a_few_times_and_never_per_micro_batch(command, llama_dir, tmp_path,
                                                                               counted, monkeypatch):
    """One optimizer step of 4 micro-batches on the path a GPU takes (packed rows, the block-mask
    attention): the reads do not grow with the micro-batches."""
    import dialogtrain.train.attention as attention
    from dialogtrain.train import loop
    from dialogtrain.train.distributed import distributed_world

    monkeypatch.setattr(attention, "attention_path", lambda device, dtype, dropout=0.0: attention.BLOCK_MASK)
    if command == "sft":
        module, data = "dialogtrain.sft", write_pairs_csv(tmp_path / "p.csv")
    else:
        from tests.test_dpo import QUESTIONS, write_preferences_jsonl

        module, data = "dialogtrain.dpo", write_preferences_jsonl(tmp_path / "p.jsonl", QUESTIONS[:8])
    import importlib

    recipe = importlib.import_module(module)
    reads = {}
    real_step = recipe.train_step

    def step(engine, run, state, indices):
        with counted:
            stats = real_step(engine, run, state, indices)
        reads[len(reads)] = dict(counted.reads)
        counted.reads.clear()
        return stats

    monkeypatch.setattr(recipe, "train_step", step)
    real_choose = loop.choose_collate

    def host_side_collate(*args, **kwargs):
        collate = real_choose(*args, **kwargs)

        def uncounted(examples):
            with _disable_current_modes():
                return collate(examples)

        uncounted.keywords = collate.keywords
        return uncounted

    monkeypatch.setattr(loop, "choose_collate", host_side_collate)
    for grad_accum in (1, 4):
        reads.clear()
        run_json = write_run_dir(tmp_path / f"run-{grad_accum}", command=command, model=str(llama_dir),
                                 data=str(data), micro_batch=1, grad_accum=grad_accum, max_steps=2,
                                 precision="fp32", gpus="cpu")
        with single_process_env(), distributed_world() as world:
            loop.train(run_json, world, recipe)
        per_step = reads[1]  # the second step: nothing of the start-up
        total = sum(per_step.values())
        if grad_accum == 1:
            one_micro_batch = total
            assert total <= 4, per_step
        else:
            assert total == one_micro_batch, per_step  # 4 micro-batches read no more than 1
