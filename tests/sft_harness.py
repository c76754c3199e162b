"""Run the real SFT worker in this process (rank 0 of a world of 1) and data files for the tests."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import socket
from pathlib import Path

PAIRS = [
    ("hello there", "hi how are you"),
    ("what is your name", "my name is bot"),
    ("tell me a joke please", "why did the chicken cross the road"),
    ("what is the weather like", "it is sunny and warm outside"),
    ("good bye", "see you later"),
    ("how are you today", "i am fine thank you"),
    ("who are you", "i am a bot and i like to chat"),
    ("the quick brown fox", "jumps over the lazy dog"),
]


def write_pairs_csv(path: Path, pairs=PAIRS) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["query", "response"])
        writer.writerows(pairs)
    return path


def write_messages_jsonl(path: Path, pairs=PAIRS, system: str | None = "you are a helpful bot") -> Path:
    """Multi-turn conversations of varying length built from PAIRS."""
    with open(path, "w") as f:
        for i in range(len(pairs)):
            turns = [] if system is None or i % 2 else [{"role": "system", "content": system}]
            for query, response in pairs[i:i + 1 + i % 3]:
                turns += [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
            f.write(json.dumps({"messages": turns}) + "\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def single_process_env():
    keys = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def write_run_dir(run_dir: Path, command: str = "sft", world_size: int = 1, **flat) -> Path:
    """RUN/run.json and RUN/ds_config.json exactly as the launcher writes them."""
    from dialogtrain.options import RunOptions
    from launcher.ds_config import build_ds_config, load_template

    # The launcher resolves --precision auto from the device; these runs pin it (fp32 unless given), so a
    # test computes the same on every CPU.
    options = RunOptions.from_flat(command, {"output": str(run_dir), "precision": "fp32", **flat},
                                   world_size=world_size)
    run_dir.mkdir(parents=True, exist_ok=True)
    options.save(run_dir / "run.json")
    (run_dir / "ds_config.json").write_text(json.dumps(build_ds_config(options, load_template(options), device="cpu"), indent=2))
    return run_dir / "run.json"


def train_in_process(run_json: Path, module: str = "sft"):
    """The worker's `train` on rank 0 of a world of one; returns the engine."""
    import importlib

    from dialogtrain.train.distributed import distributed_world

    worker = importlib.import_module(f"dialogtrain.{module}")
    with single_process_env(), distributed_world() as world:
        return worker.train(run_json, world)
