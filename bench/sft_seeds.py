"""The SFT learning row at other training seeds, outside the table: how far the held-out loss of each side
moves with the seed alone (the data split stays the bench's).

    python -m bench.sft_seeds [SEED ...]   (default: 7 13; work in bench/work/sft-seed-N)

One JSON line per seed: the held-out loss of ours and TRL's after the SFT row's steps, fp32, on the
bench's workload.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from bench.plan import FULL
from bench.run import BENCH, Context, measure_sft
from bench.workload import default_model, write_workload


def main(seeds: list[int]) -> None:
    for seed in seeds:
        plan = dataclasses.replace(FULL, seed=seed)
        out = BENCH / "work" / f"sft-seed-{seed}"
        data = write_workload(out / "data", plan.sft_held_out, plan.dpo_steps * plan.micro_batch, plan.dpo_held_out)
        # the peaks only scale MFU, which this does not report
        ctx = Context(plan, default_model(), data, "fp32", {"fp32": 1.0, "bf16": 1.0}, out, quick=False,
                      default_workload=True)
        r: dict = {}
        measure_sft(ctx, r)
        print(json.dumps({"seed": seed, "ours": r["ours_sft"]["eval_loss"], "trl": r["trl_sft"]["eval_loss"]}),
              flush=True)


if __name__ == "__main__":
    main([int(s) for s in sys.argv[1:]] or [7, 13])
