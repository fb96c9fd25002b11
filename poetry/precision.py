"""Which float format a run computes in (`train.precision`) and stores its frozen weights in (`model.dtype`), fitted
to the hardware when the config says `auto`.

- CUDA: bf16 where the card computes it natively (Ampere and later), else fp16 (with the GradScaler).
- CPU: bf16 only where the CPU has native bf16 instructions (x86 AVX512-BF16 or AMX-BF16, Arm BF16), else fp32.
  Without them PyTorch falls back to slow kernels: on an AMD EPYC with AVX2 only, one LoRA forward+backward of the
  tiny Qwen3 took 1.4 s in fp32 and 25-34 s under bf16 autocast; with AVX512-BF16, bf16 ran ~1.7x faster than fp32.

The probe is the bf16 instruction flag itself: `torch.backends.cpu.get_cpu_capability()` says only "AVX2" or
"AVX512" (an AVX-512 CPU need not have bf16), and oneDNN's `_is_mkldnn_bf16_supported` is true on any AVX-512 core,
where bf16 is emulated. An explicit `bf16` on a CPU without it still runs, with a one-line warning.

`ONEDNN_MAX_CPU_ISA` set below AVX512_CORE_BF16 takes the bf16 kernels away whatever the CPU has (measured on a Xeon
with AMX: a bf16 linear layer 33x slower than fp32 at AVX2, 4x at AVX512_CORE), so it counts as no native bf16.
With `ATEN_CPU_CAPABILITY=avx2` and `MKL_ENABLE_INSTRUCTIONS=AVX2` beside it, an AVX-512 machine times an AVX2-only
one's kernels (README, Precision: chosen by the hardware).
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # as /proc/cpuinfo spells them
# oneDNN's instruction-set caps below its first with bf16 arithmetic (dnnl_cpu_isa_t, in order)
ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


@dataclass(frozen=True)
class Choice:
    value: str  # fp32, bf16 or fp16
    reason: str  # why, in a few words, for the start-up line
    warning: str = ""  # set when an explicit choice will run far slower than another one here


def default_device(force_cpu: bool = False) -> str:
    return "cuda" if torch.cuda.is_available() and not force_cpu else "cpu"


def cuda_native_bf16() -> bool:
    """Whether this process's GPU computes bf16 in hardware (compute capability 8.0, Ampere, or later; any ROCm card).

    Not `torch.cuda.is_bf16_supported()`: by default it also says yes for a V100 or T4, which can hold a bf16 tensor
    but emulates its arithmetic, where fp16 with the GradScaler is the fast choice; and it asks the current device,
    which before Accelerate has placed each rank is GPU 0 on every rank. This asks the rank's own card
    (LOCAL_RANK, as launchers set it) and makes no tensor, so no CUDA context lands on another rank's GPU."""
    if torch.version.hip:
        return True
    return torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).major >= 8


def cpuinfo_field(names: tuple[str, ...], cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The first CPU's value of the first of `names` found in /proc/cpuinfo; None where it or the file is absent."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in names:
            return value.strip()
    return None


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The first CPU's feature flags (x86 `flags`, Arm `Features`); empty where /proc/cpuinfo is absent."""
    return set((cpuinfo_field(("flags", "Features"), cpuinfo) or "").split())


@lru_cache(maxsize=1)
def cpu_native_bf16() -> tuple[bool, str]:
    """(has native bf16, the instruction set that says so or the reason it does not)."""
    probes = [("avx512_bf16", getattr(torch.cpu, "_is_avx512_bf16_supported", None)),
              ("amx_bf16", getattr(torch.cpu, "_is_amx_tile_supported", None))]
    found = [name for name, probe in probes if probe is not None and probe()]
    flags = cpu_flags()
    found += [flag for flag in X86_BF16_FLAGS if flag in flags and flag not in found]
    if platform.machine().lower() in ("aarch64", "arm64") and "bf16" in flags:
        found.append("arm bf16")
    onednn_cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if found and onednn_cap in ONEDNN_ISAS_WITHOUT_BF16:
        return False, f"ONEDNN_MAX_CPU_ISA={onednn_cap} takes away the bf16 kernels of {'/'.join(found)}"
    if found:
        return True, "/".join(found)
    return False, "no avx512_bf16 or amx_bf16 flag" if platform.machine().lower() in ("x86_64", "amd64") else \
        "no bf16 flag"


def choose(requested: str, device: str, what: str = "precision") -> Choice:
    """Resolve `auto` (or check an explicit choice) for `device` ('cpu' or 'cuda')."""
    if device == "cuda":
        if not torch.cuda.is_available():  # planning for a GPU elsewhere (python -m poetry.memory)
            return Choice("bf16" if requested == "auto" else requested,
                          "auto: bf16, as on any card since Ampere (no GPU here to ask)" if requested == "auto"
                          else "as configured")
        bf16_ok = cuda_native_bf16()
        if requested == "auto":
            return Choice("bf16", "auto: this GPU supports bf16") if bf16_ok else \
                Choice("fp16", "auto: this GPU has no bf16")
        if requested == "bf16" and not bf16_ok:
            return Choice("bf16", "as configured", f"{what}=bf16 on a GPU without bf16 support; use auto or fp16")
        return Choice(requested, "as configured")
    native, detail = cpu_native_bf16()
    if requested == "auto":
        return Choice("bf16", f"auto: this CPU has native bf16, {detail}") if native else \
            Choice("fp32", f"auto: this CPU has no native bf16, {detail}")
    if requested == "bf16" and not native:
        return Choice("bf16", "as configured", f"{what}=bf16 on a CPU without native bf16 ({detail}): it runs about "
                                               f"20x slower than fp32 here; use auto or fp32")
    if requested == "fp16":
        return Choice("fp16", "as configured", f"{what}=fp16 on a CPU: about 8x slower than fp32; use auto or fp32")
    return Choice(requested, "as configured")
