"""What this CPU can do fast, read without importing torch (the launcher uses it too)."""

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


def fastest_cpu_precision() -> str:
    """bf16 where the CPU computes it natively (AMX, AVX512-BF16), else fp32."""
    return "bf16" if cpu_has_native_bf16() else "fp32"


SLOW_BF16_NOTE = ("--precision bf16: this CPU has no AMX or AVX512-BF16, so bf16 is emulated and far slower "
                  "than fp32 here (about 50x on an AVX2 CPU); --precision fp32 is faster")
