"""What the command-line tools share: `--help` shows every option with its default and answers before torch loads;
and `python -m poetry.memory` on built-in models, missing model paths and DDP process counts."""
import argparse
import importlib.util
import os
import subprocess
import sys

import pytest

from poetry.data.__main__ import _parser as data_parser
from poetry.memory import _parser as memory_parser
from poetry.memory import main as memory_main

from conftest import ROOT

TINY_CONFIG = ROOT / "configs" / "tiny.yaml"


def load_script(name: str):
    """infer.py or evaluate.py, loaded by path: the repo root is not on sys.path."""
    spec = importlib.util.spec_from_file_location(f"{name}_cli", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


infer = load_script("infer")
evaluate = load_script("evaluate")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def every_parser() -> dict[str, argparse.ArgumentParser]:
    parsers = {"evaluate.py": evaluate._parser(), "python -m poetry.memory": memory_parser()}
    for prog, parser in (("infer.py", infer._parser()), ("python -m poetry.data", data_parser())):
        parsers[prog] = parser
        parsers.update({f"{prog} {name}": sub for name, sub in subcommands(parser).items()})
    return parsers


@pytest.mark.parametrize("parser", every_parser().values(), ids=every_parser().keys())
def test_every_option_has_help_and_shows_its_default(parser):
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings:
            continue
        shown = formatter._expand_help(action) if action.help else ""
        assert shown.strip(), f"{action.option_strings} has no help text"
        if action.default not in (None, False, argparse.SUPPRESS):
            assert "(default: " in shown, f"{action.option_strings}: the default {action.default!r} is not shown"


def help_text(main, argv: list[str], capsys) -> str:
    """What `--help` prints, on one line (argparse wraps help texts to the terminal's width)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("main, argv, expected", [
    (infer.main, ["predict", "--help"], ["--batch-size BATCH_SIZE questions decoded together (default: 8)",
                                         "(default: 64)", "(default: constrained)", "(default: auto)"]),
    (infer.main, ["merge", "--help"], ["(default: auto)"]),
    (infer.main, ["chat", "--help"], ["softmax temperature (default: 0.7)", "(default: 0.9)", "(default: 256)"]),
    (infer.main, ["--help"], ["predict", "merge", "chat", "--dtype auto"]),
    (evaluate.main, ["--help"], ["layer whose embeddings are compared (default: 8)",
                                 "scoring runs in fp32 whatever the checkpoint's dtype"]),
    (memory_main, ["--help"], ["(default: 32.0)", "(default: 1)"]),
], ids=["infer-predict", "infer-merge", "infer-chat", "infer", "evaluate", "memory"])
def test_help_shows_defaults(main, argv, expected, capsys):
    shown = help_text(main, argv, capsys)
    for text in expected:
        assert text in shown


def test_data_help_shows_defaults(capsys):
    from poetry.data.__main__ import main

    shown = help_text(main, ["stats", "--help"], capsys)
    assert "(default: 3)" in shown and "(default: error)" in shown
    assert "directory for questions.json and gold.json" in help_text(main, ["export-val", "--help"], capsys)


def imported_modules(script: str, *argv: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `script` with `-X importtime`; the top-level names of every module it imported."""
    done = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / script), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in done.stderr.splitlines() if line.startswith("import time:") and "|" in line]
    return done, {line.rsplit("|", 1)[1].strip().split(".")[0] for line in lines[1:]}  # [0] is the header


@pytest.mark.parametrize("script, argv, usage", [
    ("infer.py", ["--help"], "usage: infer.py"),
    ("infer.py", ["chat", "--help"], "usage: infer.py chat"),
    ("evaluate.py", ["--help"], "usage: evaluate.py"),
])
def test_help_answers_before_torch_loads(script, argv, usage):
    done, modules = imported_modules(script, *argv)
    assert done.returncode == 0 and done.stdout.startswith(usage), done.stderr[-2000:]
    assert "argparse" in modules  # the -X importtime lines were read
    assert not {"torch", "transformers", "nltk"} & modules


@pytest.mark.parametrize("argv, error", [(["perplex"], "error: unknown subcommand 'perplex'"),
                                         (["perplexity"], "the following arguments are required: --model")])
def test_usage_errors_answer_before_torch_loads(argv, error):
    done, modules = imported_modules("infer.py", *argv)
    assert done.returncode == 2 and error in done.stderr
    assert "torch" not in modules


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def memory(model_cache, monkeypatch, capsys):
    """`python -m poetry.memory ARGS` in-process on configs/tiny.yaml: (exit code, stdout, stderr)."""
    monkeypatch.setenv("POETRY_SFT_CACHE", str(model_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("COLUMNS", "160")  # rich would otherwise wrap the table to 80 columns

    def run(*argv: str):
        code = memory_main(["--config", str(TINY_CONFIG), *argv])
        printed = capsys.readouterr()
        return code, printed.out, printed.err

    return run


def row(table: str, what: str) -> str:
    return next(line for line in table.splitlines() if line.strip("│ ").startswith(what))


def test_memory_estimate_of_a_builtin_model(memory, model_cache):
    code, out, err = memory()
    assert code == 0 and err == ""
    assert (model_cache / "tiny-qwen3" / "config.json").is_file()  # built on first use
    assert "memory estimate (cuda)" in out and "total (fits in 32 GiB)" in out


def test_memory_estimate_is_of_a_gpu_run_even_on_a_cpu(memory):
    # train.precision=auto resolves to fp32 on this CPU, but the estimate is of a CUDA run: 2-byte weights
    code, out, _ = memory()
    assert code == 0 and "fp32" not in row(out, "base weights") and "fp32" not in row(out, "embeddings")


def test_memory_on_cpu_measures_the_process_with_its_data(memory, few_poems, tmp_path):
    code, out, err = memory("--device", "cpu", f"data.train={few_poems}")
    assert code == 0 and err == ""
    assert "memory estimate (cpu)" in out and "tokenised data" in row(out, "process before the weights")
    code, out, err = memory("--device", "cpu", f"data.train={tmp_path / 'absent.json'}")
    assert code == 2 and out == "" and err.startswith("error: ") and "absent.json" in err and err.count("\n") == 1


def test_memory_missing_model_is_one_error_line(memory, tmp_path):
    absent = tmp_path / "no-such-model"
    code, out, err = memory(f"model.path={absent}")
    assert code == 2 and out == ""
    assert err == f"error: model.path={absent}: no such directory (and HF_HUB_OFFLINE=1, so no hub download)\n"


def test_memory_processes_without_fsdp_are_noted(memory):
    code, out, err = memory("--processes", "4")
    assert code == 0 and err.count("\n") == 1
    assert err.startswith("note: --processes 4 without train.fsdp=true: DDP replicates the whole model")
    _, alone, _ = memory()
    assert row(out, "total") == row(alone, "total")
    code, sharded, err = memory("--processes", "4", "train.fsdp=true")
    assert code == 0 and err == "" and "per process of 4 (FSDP)" in sharded
