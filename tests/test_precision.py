"""`auto` precision and dtype fitted to the hardware; each CPU kind simulated, so these hold on any machine."""
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
    """Pretend to run on a CPU with the given /proc/cpuinfo (torch's own probes silenced, no GPU)."""
    read_flags = precision.cpu_flags

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


def test_explicit_slow_choices_run_with_a_warning(cpu):
    cpu(AMD_AVX2)
    bf16 = precision.choose("bf16", "cpu", "train.precision")
    assert bf16.value == "bf16" and "train.precision=bf16 on a CPU without native bf16" in bf16.warning
    assert "20x slower" in bf16.warning and "\n" not in bf16.warning
    assert "8x slower" in precision.choose("fp16", "cpu").warning
    assert not precision.choose("fp32", "cpu").warning
    cpu(INTEL_BF16)
    assert not precision.choose("bf16", "cpu").warning


@pytest.mark.parametrize("bf16_supported, expected", [(True, "bf16"), (False, "fp16")])
def test_auto_on_cuda_prefers_bf16_else_fp16(monkeypatch, bf16_supported, expected):
    monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(precision.torch.cuda, "is_bf16_supported", lambda: bf16_supported)
    assert precision.choose("auto", "cuda").value == expected
    assert bool(precision.choose("bf16", "cuda").warning) is not bf16_supported


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
