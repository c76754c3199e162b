"""Each rank's random number generator states (python, numpy, torch, CUDA), saved with a checkpoint and restored."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch


def save_rng_state(folder: Path, rank: int) -> str:
    """folder/rng-rankNNNNN.safetensors: the python, numpy, torch (and CUDA) RNG states of this rank."""
    from safetensors.torch import save_file

    version, python_keys, gauss = random.getstate()
    kind, numpy_keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"python": torch.tensor(python_keys, dtype=torch.int64),
               "numpy": torch.from_numpy(numpy_keys.astype(np.int64)),
               "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    scalars = {"python_version": version, "python_gauss": gauss, "numpy_kind": kind, "numpy_pos": pos,
               "numpy_has_gauss": has_gauss, "numpy_cached_gaussian": cached}
    path = folder / f"rng-rank{rank:05d}.safetensors"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"scalars": json.dumps(scalars)})
    return str(path)


def restore_rng_state(folder: Path, rank: int) -> None:
    """Set this rank's RNG states from the checkpoint; a rank the checkpoint did not have keeps its seed."""
    from safetensors import safe_open

    path = folder / f"rng-rank{rank:05d}.safetensors"
    if not path.exists():
        return
    with safe_open(str(path), framework="pt") as f:
        scalars = json.loads(f.metadata()["scalars"])
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    random.setstate((scalars["python_version"], tuple(tensors["python"].tolist()), scalars["python_gauss"]))
    np.random.set_state((scalars["numpy_kind"], tensors["numpy"].numpy().astype(np.uint32), scalars["numpy_pos"],
                         scalars["numpy_has_gauss"], scalars["numpy_cached_gaussian"]))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def seed_everything(seed: int) -> None:
    """The same seed for python, numpy and torch (every device), so a run repeats."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
