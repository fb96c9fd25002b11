"""Silencing the Hugging Face libraries' progress bars, which write carriage returns into logs (the run's own console
and the CLIs' own progress lines replace them), and warnings no user can act on. Importing this module loads
nothing heavy, so a CLI can call `quiet_progress_bars()` before transformers is imported (the hub and datasets read
their switch at import)."""
from __future__ import annotations

import os
import sys
import warnings

# a value the user set is kept
QUIET_ENVIRONMENT = {
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers follows the hub's switch when it is imported
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}


def quiet_progress_bars() -> None:
    """No bars from libraries imported after this call (they read the environment) nor from those already imported."""
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging

        logging.disable_progress_bar()


def quiet_libraries() -> None:
    """No bars, and only transformers' errors: for a training run or a benchmark, whose own lines say what matters.
    Imports transformers."""
    quiet_progress_bars()
    ignore_v4_names()
    from transformers.utils import logging

    logging.set_verbosity_error()


def ignore_v4_names() -> None:
    """PEFT still calls transformers' v4 names (is_gradient_checkpointing, on every adapter it loads): a warning
    no user can act on. Inside `warnings.catch_warnings()` for that block only, else for the rest of the process."""
    warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in v6", category=FutureWarning)
