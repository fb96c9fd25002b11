"""Writing in a form, side by side in one run: free decoding (the model alone) against constrained decoding with
tones off and loose (poetry.write), on held-out titles of known form. Per setting: form, rhyme and tone rates,
every-rule rate, Distinct-2, copying from the training poems (poetry.prosody.score), seconds, and what allowing one
character a token took from the model. The JSON (with every poem and its check) goes to bench/results/.

    python bench/writing.py [--model builtin:gemma-3-270m] [--adapter DIR] [--config configs/demo.yaml]
        [--poems PATH] [--count 20] [--settings free,off,loose] [--batch-size 8] [--dtype auto|fp32|bf16]
        [--label zero-shot] [--results-dir bench/results]

The titles and forms are those of the held-out poems of --config's split of --poems (its data.train by default),
so a run's adapter is measured on poems it never saw; copying is measured against the training side of the split.
With too few held-out poems of known form, the rest come from the training side, and the JSON says how many.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    RESULTS_DIR,
    add_dtype_option,
    autocast_dtype,
    console,
    inference_model,
    wilson,
    write_results,
)
from poetry.builtin import resolve_model_path  # noqa: E402
from poetry.config import load_config  # noqa: E402
from poetry.data.mix import load_training_poems  # noqa: E402
from poetry.model import load_tokenizer  # noqa: E402
from poetry.prompt import PromptFormat  # noqa: E402
from poetry.prosody import poem_form, writing_title  # noqa: E402
from poetry.prosody.score import score_writing  # noqa: E402
from poetry.quiet import quiet_libraries  # noqa: E402
from poetry.write import several_character_share, write_poems  # noqa: E402

SETTINGS = {"free": ("free decoding", False, "off"), "off": ("constrained, tones off", True, "off"),
            "loose": ("constrained, tones loose", True, "loose"), "strict": ("constrained, tones strict", True,
                                                                              "strict")}


def titles(args: argparse.Namespace) -> tuple[list, list[str], int]:
    """(form, title) requests, the training side's texts (for copying), and how many requests are held out."""
    cfg = load_config(args.config, [f"data.train={args.poems}"] if args.poems else [])
    mixture, val = load_training_poems(cfg.data, cfg.train.seed)
    train = mixture.poems
    known = [(poem, form) for poem in val + train if (form := poem_form(poem.title, poem.content, poem.source))]
    chosen = known[:args.count]
    held_out = sum(poem in val for poem, _ in chosen)
    return [(form, writing_title(poem.title, form)) for poem, form in chosen], [p.content for p in train], held_out


def form_interval(scores) -> tuple[float, float]:
    """The Wilson 95% interval of the share of poems in form (scores.form is a count over scores.poems)."""
    return wilson(round(scores.form * scores.poems), scores.poems)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:gemma-3-270m")
    parser.add_argument("--adapter", help="a PEFT adapter directory (a run's checkpoint): the fine-tuned model")
    parser.add_argument("--config", default="configs/demo.yaml", help="whose split holds the titles out")
    parser.add_argument("--poems", help="training poems to split (default: the config's data.train)")
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--settings", default="free,off,loose", help=f"some of {', '.join(SETTINGS)}")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--label", help="what the model is, for the table (default: zero-shot or the adapter)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    add_dtype_option(parser)
    args = parser.parse_args()
    quiet_libraries()
    dtype = autocast_dtype(args.dtype)
    path = resolve_model_path(args.model)
    model = inference_model(path, dtype.value, args.adapter)
    fmt = PromptFormat(load_tokenizer(path))
    requests, corpus, held_out = titles(args)
    label = args.label or ("fine-tuned" if args.adapter else "zero-shot")
    results, rows = {}, []
    for key in args.settings.split(","):
        name, constrained, tones = SETTINGS[key]
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype.value == "bf16"):
            written = [c[0] for c in write_poems(model, fmt, requests, tones=tones, batch_size=args.batch_size,
                                                 constrained=constrained)]
        seconds = time.perf_counter() - started
        scores = score_writing([(form, w.text) for (form, _), w in zip(requests, written, strict=True)], corpus)
        several = several_character_share(written) if constrained else None
        results[key] = {"setting": name, "seconds": seconds, "scores": scores.__dict__, "several": several,
                        "form_interval_95": form_interval(scores),
                        "poems": [{"form": form.name, "title": title, **w.to_json()}
                                  for (form, title), w in zip(requests, written, strict=True)]}
        rows.append((name, scores, seconds, several))
    table = Table(title=f"writing {len(requests)} poems ({held_out} held out), {label}, {dtype.value}")
    for column in ("setting", "form", "form, 95% interval", "rhyme", "tone", "every rule", "Distinct-2",
                   "lines copied", "seconds", "top token of several characters"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    for name, s, seconds, several in rows:
        low, high = form_interval(s)
        table.add_row(name, f"{s.form:.2f}", f"{low:.2f}-{high:.2f}", f"{s.rhyme:.2f}",
                      "-" if s.tone is None else f"{s.tone:.2f}",
                      f"{s.regular:.2f}", f"{s.distinct_2:.2f}", f"{s.copied_lines:.2f}", f"{seconds:.0f}",
                      "-" if several is None else f"{several[0]}/{several[1]} ({several[2]:.1%} of the mass)")
    console.print(table)
    out = write_results(f"writing-{label}", {"label": label, "model": args.model, "adapter": args.adapter,
                                              "dtype": dtype.value, "held_out": held_out, "count": len(requests),
                                              "results": results}, args.results_dir)
    console.print(f"results: {out}")


if __name__ == "__main__":
    main()
