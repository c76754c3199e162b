"""The bench's "host_memory" group: peak host RSS per rank of ZeRO-3 loading whole vs partitioned.

    python -m bench.run --only host_memory [--quick]

The real SFT worker (bench.memory_worker around it, as the memory rows) at ZeRO-3 on 2 processes,
twice: with DIALOGTRAIN_WHOLE_LOAD=1, every rank loads the whole model (in fp32, or bf16 for
pure-bf16) before `deepspeed.initialize` partitions it (the way before zero.Init), and with the
default, where transformers loads under DeepSpeed's zero.Init (HfDeepSpeedConfig) so each rank only
ever holds its partition. Per rank, the larger of the two: peak RSS of training minus RSS right
before the model is built (what the memory rows call peak), and the peak once the model is loaded.
At 135M parameters the whole model is 0.5 GiB in fp32, less than the activations of a step, so the
training peak moves less than the load peak; the saving grows with the model (a 7B model is 28 GB
per rank loaded whole in fp32, 28/N partitioned).
"""

from __future__ import annotations

from bench.runner import progress

LOADINGS = {"whole": {"DIALOGTRAIN_WHOLE_LOAD": "1"}, "partitioned": {}}


def measure(ctx, r: dict) -> None:
    from bench.run import memory_run  # bench.run's GROUPS imports this module

    result = {}
    for loading, env in LOADINGS.items():
        progress(f"host memory: ZeRO-3 x2, {loading} load")
        run = memory_run(ctx.model, ctx.data, ctx.plan, ctx.precision, ctx.out, zero=3, nproc=2,
                         name=f"host-memory-zero3-x2-{loading}", extra_env=env)
        run["load_peak_bytes"] = max(rank["peak_rss_after_load"] - rank["rss_before_model"] for rank in run["ranks"])
        result[loading] = run
    r["host_memory"] = result


def rows(r: dict, plan) -> list[dict]:
    from bench.table import row  # bench.table's ROWS imports this module

    whole, partitioned = r["host_memory"]["whole"], r["host_memory"]["partitioned"]
    ratio = partitioned["peak_bytes"] / whole["peak_bytes"]
    return [row("peak host RSS per rank, ZeRO-3 x2: whole load -> partitioned load (zero.Init); "
                "in brackets the peak once loaded",
                f"{whole['peak_bytes'] / 2**20:.0f} MiB -> {partitioned['peak_bytes'] / 2**20:.0f} MiB "
                f"({whole['load_peak_bytes'] / 2**20:.0f} -> {partitioned['load_peak_bytes'] / 2**20:.0f})",
                "", f"{ratio:.2f}x", "< 1x", ratio < 1)]
