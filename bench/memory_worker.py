"""The real SFT worker, with its model-state memory measured: what `make bench` launches for the memory rows.

    torchrun ... -m bench.memory_worker RUN/run.json

`dialogtrain.sft.train` runs unchanged; the only addition is a note of this process's RSS right
before the model is built (after the libraries are imported and the data is encoded) and its peak
RSS when training ends (before the export to RUN/final gathers the whole model on rank 0) and at the end.
Each rank writes RUN/memory-rank<R>.json: {"rss_before_model", "peak_rss_training", "peak_rss"} in bytes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from bench.timing import peak_rss_bytes, rss_bytes


def main() -> None:
    import dialogtrain.sft as sft
    from dialogtrain.distributed import distributed_world

    run_json = Path(sys.argv[1])
    before = []
    load_model = sft.load_model

    def load_model_noting_rss(*args, **kwargs):
        before.append(rss_bytes())
        return load_model(*args, **kwargs)

    sft.load_model = load_model_noting_rss
    save_final = sft.save_final
    trained = []

    def save_final_noting_peak(*args, **kwargs):
        trained.append(peak_rss_bytes())
        return save_final(*args, **kwargs)

    sft.save_final = save_final_noting_peak
    with distributed_world() as world:
        sft.train(run_json, world)
    rank = int(os.environ.get("RANK", 0))
    (run_json.parent / f"memory-rank{rank}.json").write_text(
        json.dumps({"rss_before_model": before[0], "peak_rss_training": trained[0], "peak_rss": peak_rss_bytes()}) + "\n")


if __name__ == "__main__":
    main()
