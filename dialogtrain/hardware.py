"""Which precision a device computes fast: CPU flags and GPU compute capability, read without torch."""

from __future__ import annotations

from pathlib import Path

# Instructions that make bf16 matmuls native on x86 CPUs; without them oneDNN emulates bf16, which
# measured 50x slower than fp32 on an AVX2-only AMD EPYC (0.46 vs 23 GFLOP/s on 2 cores).
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_native_bf16(flags: set[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


SLOW_BF16_NOTE = ("--precision bf16: this CPU has no AMX or AVX512-BF16, so bf16 is emulated and far slower "
                  "than fp32 here (about 50x on an AVX2 CPU); --precision fp32 is faster")

# bf16 tensor cores arrived with compute capability 8.0 (A100, RTX 30xx); V100 (7.0) and T4 (7.5) have
# fp16 tensor cores and emulate bf16, so torch.cuda.is_bf16_supported() (which counts emulation) says
# yes where bf16 is slow.
BF16_CAPABILITY = (8, 0)


def gpu_precision(capability: tuple[int, int]) -> str:
    """The mixed precision a GPU of this compute capability runs fastest: bf16 from 8.0, fp16 below."""
    return "bf16" if capability >= BF16_CAPABILITY else "fp16"


def auto_precision(kind: str, capabilities: list[tuple[int, int]] | None) -> tuple[str, str]:
    """(precision, why) of `--precision auto` on the CPU, or on GPUs of these compute capabilities (the
    slowest decides; None: unknown, e.g. the hosts of a --hostfile seen from a machine without a GPU)."""
    if kind == "cpu":
        if cpu_has_native_bf16():
            return "bf16", "this CPU computes bf16 natively (AMX or AVX512-BF16)"
        return "fp32", "this CPU has no native bf16 (no AMX or AVX512-BF16), where bf16 is emulated and slow"
    if not capabilities:
        return "bf16", "the GPUs cannot be queried from here; bf16 assumed (pass --precision fp16 for V100/T4)"
    lowest = min(capabilities)
    precision = gpu_precision(lowest)
    return precision, (f"GPU compute capability {lowest[0]}.{lowest[1]}"
                       + (" has bf16 tensor cores" if precision == "bf16" else " has no bf16 tensor cores"))
