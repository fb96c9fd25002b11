"""`auto` precision and dtype fitted to the hardware; each CPU kind simulated, so these hold on any machine."""
from types import SimpleNamespace

import pytest
import yaml

from poetry import precision
from poetry.config import load_config

from conftest import ROOT

AMD_AVX2 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx fma avx2 bmi2\n\nprocessor\t: 1\n"
INTEL_BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile\n"
INTEL_AVX512_NO_BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_vnni\n"


@pytest.fixture
def cpu(monkeypatch, tmp_path):
    """Pretend to run on a CPU with the given /proc/cpuinfo (torch's own probes silenced, no GPU, oneDNN uncapped)."""
    read_flags = precision.cpu_flags
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)

    def pretend(cpuinfo: str, machine: str = "x86_64") -> None:
        path = tmp_path / "cpuinfo"
        path.write_text(cpuinfo)
        monkeypatch.setattr(precision, "cpu_flags", lambda: read_flags(path))
        monkeypatch.setattr(precision.torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
        monkeypatch.setattr(precision.torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
        monkeypatch.setattr(precision.platform, "machine", lambda: machine)
        monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: False)
        precision.cpu_native_bf16.cache_clear()

    yield pretend
    precision.cpu_native_bf16.cache_clear()


def test_cpu_flags_reads_the_first_processor(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(AMD_AVX2)
    assert {"avx2", "fma"} <= precision.cpu_flags(path) and "avx512_bf16" not in precision.cpu_flags(path)
    assert precision.cpu_flags(tmp_path / "absent") == set()


@pytest.mark.parametrize("cpuinfo, machine, expected", [
    (AMD_AVX2, "x86_64", "fp32"),
    (INTEL_AVX512_NO_BF16, "x86_64", "fp32"),  # AVX-512 alone is not bf16: oneDNN would emulate it
    (INTEL_BF16, "x86_64", "bf16"),
    ("Features\t: fp asimd sve bf16 i8mm\n", "aarch64", "bf16"),
    ("Features\t: fp asimd\n", "aarch64", "fp32"),
])
def test_auto_on_cpu_takes_bf16_only_with_native_instructions(cpu, cpuinfo, machine, expected):
    cpu(cpuinfo, machine)
    choice = precision.choose("auto", "cpu")
    assert choice.value == expected and choice.reason.startswith("auto: this CPU has") and not choice.warning


def test_torch_probe_alone_is_enough(cpu, monkeypatch):
    cpu(AMD_AVX2)
    monkeypatch.setattr(precision.torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    precision.cpu_native_bf16.cache_clear()
    assert precision.choose("auto", "cpu").value == "bf16"


@pytest.mark.parametrize("cap, expected", [
    ("AVX2", "fp32"), ("avx512_core", "fp32"), ("AVX512_CORE_VNNI", "fp32"),  # oneDNN below its bf16 kernels
    ("AVX512_CORE_BF16", "bf16"), ("AVX10_1_512_AMX", "bf16"), ("DEFAULT", "bf16"), ("", "bf16"),
])
def test_a_onednn_cap_below_bf16_counts_as_no_native_bf16(cpu, monkeypatch, cap, expected):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    cpu(INTEL_BF16)
    choice = precision.choose("auto", "cpu")
    assert choice.value == expected
    assert ("ONEDNN_MAX_CPU_ISA" in choice.reason) == (expected == "fp32")
    if expected == "fp32":
        assert "avx512_bf16/amx_bf16" in choice.reason
        assert "20x slower" in precision.choose("bf16", "cpu").warning


def test_explicit_slow_choices_run_with_a_warning(cpu):
    cpu(AMD_AVX2)
    bf16 = precision.choose("bf16", "cpu", "train.precision")
    assert bf16.value == "bf16" and "train.precision=bf16 on a CPU without native bf16" in bf16.warning
    assert "20x slower" in bf16.warning and "\n" not in bf16.warning
    assert "8x slower" in precision.choose("fp16", "cpu").warning
    assert not precision.choose("fp32", "cpu").warning
    cpu(INTEL_BF16)
    assert not precision.choose("bf16", "cpu").warning


@pytest.fixture
def gpu(monkeypatch):
    """Pretend to be a rank of a machine whose GPUs have the given compute capability major; records which GPUs were
    asked. A card that can merely hold a bf16 tensor (torch's emulation probe) says so, as a V100 or T4 does."""
    asked = []

    def pretend(major: int, local_rank: int = 0) -> list[int]:
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        monkeypatch.setattr(precision.torch.version, "hip", None)
        monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(precision.torch.cuda, "current_device", lambda: 0)  # before Accelerate: GPU 0 everywhere
        monkeypatch.setattr(precision.torch.cuda, "_check_bf16_tensor_supported", lambda device: True)
        monkeypatch.setattr(precision.torch.cuda, "get_device_properties",
                            lambda device: asked.append(device) or SimpleNamespace(major=major))
        return asked

    return pretend


@pytest.mark.parametrize("card, major, expected", [("V100", 7, "fp16"), ("T4", 7, "fp16"), ("A100", 8, "bf16"),
                                                   ("H100", 9, "bf16")])
def test_auto_on_cuda_takes_bf16_only_where_the_card_computes_it(gpu, card, major, expected):
    """torch.cuda.is_bf16_supported() says True on a V100 or T4 (emulated bf16); those must get fp16 + GradScaler."""
    gpu(major)
    assert precision.choose("auto", "cuda").value == expected, card
    assert bool(precision.choose("bf16", "cuda").warning) is (expected == "fp16")


def test_the_cuda_probe_asks_the_ranks_own_gpu(gpu):
    """Before Accelerate places each rank, the current device is GPU 0 on every rank: asking it would put a CUDA
    context of every rank on GPU 0."""
    asked = gpu(8, local_rank=3)
    precision.choose("auto", "cuda")
    assert asked == [3]


def test_load_config_fits_auto_and_says_why(cpu):
    cpu(AMD_AVX2)
    cfg = load_config(None, [])
    assert (cfg.train.precision, cfg.model.dtype) == ("fp32", "fp32")
    assert cfg.notes == ["train.precision=fp32 (auto: this CPU has no native bf16, no avx512_bf16 or amx_bf16 flag)",
                         "model.dtype=fp32 (auto: as train.precision)"]
    cpu(INTEL_BF16)
    cfg = load_config(None, [])
    assert (cfg.train.precision, cfg.model.dtype) == ("bf16", "bf16")
    assert load_config(None, [], device="cuda").train.precision == "bf16"  # planning for a GPU from a CPU machine


def test_an_explicit_slow_dtype_is_warned_once(cpu):
    cpu(AMD_AVX2)
    cfg = load_config(None, ["train.precision=bf16", "model.dtype=bf16"])
    assert (cfg.train.precision, cfg.model.dtype) == ("bf16", "bf16")
    warnings = [note for note in cfg.notes if note.startswith("warning: ")]
    assert len(warnings) == 2 and "train.precision=bf16" in warnings[0] and "model.dtype=bf16" in warnings[1]


def test_auto_resolves_before_the_cross_field_checks(cpu):
    """fp16 over a bf16 base is refused; with auto the base follows the precision, so there is nothing to refuse."""
    cpu(AMD_AVX2)
    assert load_config(None, ["train.precision=fp16"]).model.dtype == "fp16"


def test_every_shipped_config_says_auto():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert raw["train"]["precision"] == "auto" and raw["model"]["dtype"] == "auto", path.name
