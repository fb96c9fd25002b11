"""Library progress bars are off whether quieting comes before the libraries are imported (the CLIs) or after."""
import os
import subprocess
import sys

from poetry.quiet import QUIET_ENVIRONMENT

from conftest import ROOT

BARS_OFF = """
import datasets, transformers
from huggingface_hub.utils import are_progress_bars_disabled
assert are_progress_bars_disabled() and not datasets.is_progress_bar_enabled()
assert not transformers.utils.logging.is_progress_bar_enabled()
"""

BEFORE_IMPORT = """
import sys
from poetry.quiet import quiet_progress_bars
quiet_progress_bars()
assert not {"torch", "transformers", "datasets", "huggingface_hub"} & set(sys.modules), "quieting loaded a library"
""" + BARS_OFF + """
assert transformers.utils.logging.get_verbosity() == transformers.utils.logging.WARNING  # bars only
"""

AFTER_IMPORT = """
import datasets, transformers
assert datasets.is_progress_bar_enabled() and transformers.utils.logging.is_progress_bar_enabled()
from poetry.quiet import quiet_libraries
quiet_libraries()
assert transformers.utils.logging.get_verbosity() == transformers.utils.logging.ERROR
""" + BARS_OFF


def run_clean(code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter whose environment has none of the quieting variables."""
    env = {k: v for k, v in os.environ.items() if k not in {*QUIET_ENVIRONMENT, "TRANSFORMERS_VERBOSITY"}}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)


def test_quieting_before_the_libraries_are_imported_loads_none_of_them():
    result = run_clean(BEFORE_IMPORT)
    assert result.returncode == 0, result.stderr


def test_quieting_after_the_libraries_are_imported():
    result = run_clean(AFTER_IMPORT)
    assert result.returncode == 0, result.stderr
