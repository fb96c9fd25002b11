"""Seeing what a run does: console lines, metrics.jsonl, PNG curves and optional trackers, all in one run directory.

Only the main process writes. On a TTY a rich progress bar shows the run; elsewhere (CI, `nohup`, a log file) plain
lines every `log.every` steps keep the log readable (no carriage returns, no escape codes).
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .atomic import atomic_write_text
from .config import Config, ConfigError, LogConfig, save_config

TRACKER_PROJECT = "poetry-sft"  # the wandb/swanlab project; tensorboard events go to <run dir>/poetry-sft/

@dataclasses.dataclass(frozen=True)
class Curve:
    title: str
    y_label: str
    keys: tuple[str, ...]  # the logged metrics drawn


CURVES = {
    "loss.png": Curve("Loss: training steps and held-out questions", "loss per target token (nats)",
                      ("train/loss", "val/loss", "val/writing_loss")),
    "lr.png": Curve("Learning rate", "learning rate", ("train/lr",)),
    "val.png": Curve("Held-out questions and poems: scores of what the model wrote", "score (0 to 1)",
                     ("val/acc", "val/bleu_words", "val/bleu_sents", "val/bertscore_words", "val/bertscore_sents",
                      "val/proxy_total", "val/total", "val/writing_form", "val/writing_rhyme", "val/writing_tone")),
}
ZERO_SHOT_NOTE = "step 0: the base model before training (zero-shot)"


def curve_figure(plt, curve: Curve, series: dict[str, list[tuple[int, float]]]):
    """One PNG's figure: each metric's (step, value) points, a step-0 point starred as the zero-shot start."""
    fig, ax = plt.subplots(figsize=(9, 4))
    for key, points in series.items():
        line, = ax.plot(*zip(*points, strict=True), marker="o" if len(points) < 30 else None, markersize=3, label=key)
        if points[0][0] == 0:  # where the curve would stay without training
            ax.plot(*points[0], marker="*", markersize=12, color=line.get_color(), linestyle="none")
    if any(points[0][0] == 0 for points in series.values()):
        ax.plot([], [], marker="*", markersize=10, color="grey", linestyle="none", label=ZERO_SHOT_NOTE)
    ax.set_title(curve.title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(curve.y_label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the plot, never over a curve
    fig.tight_layout()
    return fig


def tracker_for(cfg: LogConfig) -> str | None:
    """The Accelerate tracker to log to, or None. Accelerate drops a tracker whose package is missing with only a
    debug message; a run asked to log somewhere must not silently log nowhere."""
    if cfg.tracker == "none":
        return None
    from accelerate.tracking import get_available_trackers

    if cfg.tracker not in {str(tracker) for tracker in get_available_trackers()}:  # enums, not strings
        raise ConfigError(f"log.tracker={cfg.tracker}: the {cfg.tracker} package is not installed "
                          f"(pip install {cfg.tracker}, or the track extra: pip install -e '.[track]')")
    return cfg.tracker


def tracker_init_kwargs(cfg: LogConfig, run_dir: Path) -> dict:
    """Each tracker's init arguments: named after the run; wandb's and swanlab's files inside the run directory,
    offline (nothing leaves the machine, no login) unless log.tracker_mode=online."""
    return {"wandb": {"name": run_dir.name, "dir": str(run_dir), "mode": cfg.tracker_mode},
            "swanlab": {"name": run_dir.name, "log_dir": str(run_dir / "swanlog"), "mode": cfg.tracker_mode}}


def flat_config(cfg: Config) -> dict[str, int | float | str | bool]:
    """section.key -> scalar: trackers' hyper-parameter tables take no nesting (tensorboard refuses it)."""
    return {f"{section}.{key}": value if isinstance(value, (int, float, str, bool)) else str(value)
            for section, values in cfg.to_dict().items() for key, value in values.items()}


def default_run_dir() -> str:
    return str(Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_metrics(metrics: dict) -> str:
    def fmt(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
        return str(value)

    return "  ".join(f"{key.split('/')[-1] if key.startswith('train/') else key}={fmt(v)}"
                     for key, v in metrics.items())


class RunLog:
    """`resumed_at`: the optimizer step a resumed run restarts from (None for a fresh run). metrics.jsonl then keeps
    the records up to it and drops those of the steps the resume repeats, so every step appears once and the curves
    are drawn from the whole run."""

    def __init__(self, cfg: Config, run_dir: Path, is_main: bool, tracker=None, resumed_at: int | None = None):
        self.cfg, self.dir, self.is_main, self.tracker = cfg, run_dir, is_main, tracker
        self.console = Console(force_interactive=False, highlight=False, soft_wrap=True)
        self.history: list[dict] = []
        self.progress: Progress | None = None
        self.started = time.time()
        self.total_steps, self.first_step, self.loop_started = 0, 0, self.started
        if is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            # the effective config, with the run directory it went to (chosen at start when log.dir is empty)
            save_config(dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, dir=str(run_dir))),
                        self.dir / "config.yaml")
            self._carry_over_metrics(resumed_at)
            self.metrics_file = (self.dir / "metrics.jsonl").open("a", encoding="utf-8")

    def _carry_over_metrics(self, resumed_at: int | None) -> None:
        path = self.dir / "metrics.jsonl"
        if not path.is_file() or not path.stat().st_size:
            return
        if resumed_at is None:  # a fresh run in a used directory: keep the old log beside, never mixed in
            path.replace(path.with_suffix(".jsonl.prev"))
            self.print(f"{path} of an earlier run moved to {path.with_suffix('.jsonl.prev').name}")
            return
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        self.history = [r for r in records if r["step"] <= resumed_at]
        self.started -= self.history[-1]["time"] if self.history else 0.0  # elapsed time goes on from the log
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.history))
        if len(records) > len(self.history):
            self.print(f"metrics.jsonl: dropped {len(records) - len(self.history)} records of steps after "
                       f"{resumed_at}, which this resume repeats")

    def print_config(self) -> None:
        """The effective config (YAML, overrides applied), one line per section; the full file is config.yaml."""
        for section, values in self.cfg.to_dict().items():
            self.print(f"{section}: " + "  ".join(f"{key}={value}" for key, value in values.items()))

    def print(self, *parts) -> None:
        if self.is_main:
            (self.progress.console if self.progress else self.console).print(*parts)

    def start_progress(self, total_steps: int, done: int) -> None:
        self.total_steps, self.first_step = total_steps, done
        self.start_clock()
        if self.is_main and sys.stdout.isatty():
            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=self.console)
            self.progress.start()
            self.task = self.progress.add_task("train", total=total_steps, completed=done, status="")

    def start_clock(self) -> None:
        """The pace behind the ETA is measured from here (after a one-off step-0 evaluation, not before it)."""
        self.loop_started = time.time()

    def eta_s(self, step: int) -> float | None:
        """Seconds left at this session's pace so far (evaluation and saving included); None before a step."""
        done = step - self.first_step
        if done <= 0:
            return None
        return (time.time() - self.loop_started) / done * (self.total_steps - step)

    def where(self, step: int) -> str:
        """`step 12/30  elapsed 0:01:40  eta 0:02:30`: where the run is, for plain lines that have no bar."""
        eta = self.eta_s(step)
        return (f"step {step}/{self.total_steps}  elapsed {_clock(time.time() - self.started)}  "
                f"eta {'?' if eta is None else _clock(eta)}")

    def record(self, step: int, metrics: dict, echo: bool = True) -> None:
        """Append to metrics.jsonl and trackers; print a line (or update the bar)."""
        if not self.is_main:
            return
        eta = self.eta_s(step)
        record = {"step": step, "time": round(time.time() - self.started, 3), "total_steps": self.total_steps,
                  "eta_s": None if eta is None else round(eta, 1), **metrics}
        self.history.append(record)
        self.metrics_file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.metrics_file.flush()
        if self.tracker is not None:
            self.tracker.log(metrics, step=step)
        if self.progress:
            self.progress.update(self.task, completed=step, status=format_metrics(
                {k: v for k, v in metrics.items() if k in ("train/loss", "train/lr")}))
            if any(k.startswith("val/") for k in metrics):
                self.print(f"step {step}  {format_metrics(metrics)}")
        elif echo:
            self.print(f"{self.where(step)}  {format_metrics(metrics)}")

    def heartbeat(self, label: str, total: int, every_s: float = 20.0):
        """A progress callback (called with items finished) that prints a line at most every `every_s` seconds, so
        a long evaluation never sits silent."""
        state = {"done": 0, "last": time.time()}

        def report(finished: int) -> None:
            state["done"] += finished
            if time.time() - state["last"] >= every_s:
                state["last"] = time.time()
                self.print(f"  {label}: {state['done']}/{total}")

        return report

    def draw_curves(self) -> list[Path]:
        """Redraw the PNG curves from everything logged so far."""
        if not (self.is_main and self.cfg.log.curves and self.history):
            return []
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        written = []
        for name, curve in CURVES.items():
            series = {k: [(r["step"], r[k]) for r in self.history if isinstance(r.get(k), (int, float))
                          and math.isfinite(r[k])] for k in curve.keys}
            series = {k: v for k, v in series.items() if v}
            if not series:
                continue
            fig = curve_figure(plt, curve, series)
            fig.savefig(self.dir / name, dpi=100)
            plt.close(fig)
            written.append(self.dir / name)
        return written

    def close(self) -> None:
        if self.progress:
            self.progress.stop()
        if self.is_main:
            self.metrics_file.close()
