"""In-loop evaluation on the validation poems: loss / perplexity, and task metrics from constrained decoding.
With data.writing_examples, the held-out poems' writing examples (form and title in, the poem out) give
val/writing_loss and val/writing_ppl, and, decoding on, the poems the model writes freely for their forms and titles
give val/writing_form, val/writing_rhyme and val/writing_tone (poetry.prosody's checker).

Validation questions are fixed for the run (poetry.data.validation_examples), so every point of a curve scores the
same questions. Metrics are computed on each rank's share and summed over ranks before averaging (under FSDP every
rank evaluates everything: each forward is a collective).
"""
from __future__ import annotations

import math
from functools import cached_property
from typing import Callable

import torch

from .choice import answer_questions
from .config import EvalConfig
from .metrics import BertScore, combine, score_answers
from .prosody import form_named
from .prosody.score import rule_counts
from .write import write_poems


@torch.no_grad()
def target_loss_sums(loss_module, dataset, batch_size: int, collate: Callable, device, autocast: Callable,
                     shard: Callable[[list], list] = list) -> torch.Tensor:
    """[summed token loss, target tokens] (float64) of a tokenised dataset, in batches of `batch_size` examples of
    similar length; `shard` picks this rank's batches (shards may differ in size: sum them over ranks, never average
    their means)."""
    order = sorted(range(len(dataset)), key=lambda i: dataset[i]["length"])
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    totals = torch.zeros(2, device=device, dtype=torch.float64)
    for indices in shard(batches):
        batch = {k: v.to(device) for k, v in collate(dataset[indices]).items()}
        with autocast():
            loss_sum, n_targets = loss_module(**batch)
        totals += torch.stack([loss_sum.double(), n_targets.double()])
    return totals


def perplexity(loss_sum: float, n_targets: float) -> tuple[float, float]:
    """(mean loss per target token, its perplexity); the exponent is capped at 50 so a diverged run logs a number."""
    mean = loss_sum / n_targets
    return mean, math.exp(min(mean, 50.0))


class Validator:
    def __init__(self, cfg: EvalConfig, data, fmt, collate, parallel, autocast: Callable, heartbeat: Callable):
        self.cfg, self.data, self.fmt, self.collate = cfg, data, fmt, collate
        self.parallel, self.autocast, self.heartbeat = parallel, autocast, heartbeat
        self.device = parallel.accelerator.device

    @cached_property
    def loss_dataset(self):
        """The tokenised validation questions among the first eval.max_questions, the ones decoded: the loss and the
        answers describe the same poems, and the cap bounds the loss's cost too (a forward over every token)."""
        return self._first(self.data.val_dataset)

    @cached_property
    def writing_dataset(self):
        """The held-out poems' writing examples (data.writing_examples) among the first eval.max_questions, those
        written."""
        return self._first(self.data.val_writing_dataset)

    def _first(self, dataset):
        cap = self.cfg.max_questions
        if dataset is None or not cap:
            return dataset
        return dataset.select([row for row, example in enumerate(dataset["example"]) if example < cap])

    @property
    def scores_loss(self) -> bool:
        return self.cfg.loss and self.loss_dataset is not None and len(self.loss_dataset) > 0

    @property
    def scores_writing(self) -> bool:
        return self.cfg.loss and self.writing_dataset is not None and len(self.writing_dataset) > 0

    @property
    def decodes(self) -> bool:
        return self.cfg.decode and bool(self.data.val_examples)

    @property
    def writes(self) -> bool:
        return self.cfg.decode and bool(self.data.val_writing_examples)

    def describe(self) -> str:
        """What one evaluation does, for the line printed as it starts."""
        parts = []
        if self.scores_loss:
            parts.append(f"loss on {len(self.loss_dataset)} validation examples")
        if self.scores_writing:
            parts.append(f"writing loss on {len(self.writing_dataset)} held-out poems")
        if self.decodes:
            parts.append(f"decoding {len(self.data.val_examples[:self.cfg.max_questions or None])} questions")
        if self.writes:
            parts.append(f"writing {len(self.data.val_writing_examples[:self.cfg.max_questions or None])} poems")
        return ", ".join(parts) or "nothing to evaluate (no validation poems)"

    def loss(self, loss_module, dataset, prefix: str = "val/") -> dict[str, float]:
        totals = target_loss_sums(loss_module, dataset, self.cfg.batch_size, self.collate, self.device,
                                  self.autocast, self.parallel.shard)
        mean, ppl = perplexity(*self.parallel.sum(totals).tolist())
        return {f"{prefix}loss": mean, f"{prefix}ppl": ppl}

    @cached_property
    def bertscore(self) -> BertScore | None:
        if not self.cfg.bertscore_model:
            return None
        return BertScore(self.cfg.bertscore_model, self.cfg.bertscore_layer, str(self.device))

    def decode(self, loss_module, model) -> dict[str, float]:
        """Constrained greedy answers to the validation questions, scored: val/acc, val/bleu_*, val/proxy_total
        (and val/bertscore_*, val/total when eval.bertscore_model is set)."""
        examples = self.parallel.shard(self.data.val_examples[:self.cfg.max_questions or None])
        # autocast outside: whole_model's padding forwards, run as it closes, take the same precision
        with self.autocast(), self.parallel.whole_model(loss_module):
            decoded = answer_questions(model, self.fmt, [e.question for e in examples], self.cfg.batch_size,
                                       self.cfg.max_new_tokens, self.heartbeat("validation decoding", len(examples)),
                                       self.cfg.choose, self.cfg.choose_prior_weight,
                                       self.cfg.choose_channel_weight, self.cfg.draft_tokens)
        items = score_answers([e.answer for e in examples], [d.answer for d in decoded], self.bertscore).items
        words = [a for item in items for a in item.words]
        sents = [a for item in items for a in item.sents]
        values = {"bleu_words": [a.bleu for a in words], "bleu_sents": [a.bleu for a in sents],
                  "acc": [float(item.correct) for item in items if item.correct is not None]}
        if self.bertscore is not None:
            values |= {"bertscore_words": [a.bertscore for a in words], "bertscore_sents": [a.bertscore for a in sents]}
        local = [x for v in values.values() for x in (sum(v), len(v))]  # per-rank sums and counts
        totals = self.parallel.sum(torch.tensor(local, dtype=torch.float64, device=self.device))
        means = {name: (s / n if n else None) for name, (s, n) in zip(values, totals.view(-1, 2).tolist(), strict=True)}
        means["proxy_total"] = combine(means["acc"], [means["bleu_words"], means["bleu_sents"]])
        if self.bertscore is not None:
            means["total"] = combine(means["acc"], [means["bleu_words"], means["bleu_sents"],
                                                    means["bertscore_words"], means["bertscore_sents"]])
        return {f"val/{name}": value for name, value in means.items() if value is not None}

    def write(self, loss_module, model) -> dict[str, float]:
        """Poems written freely (greedy) for the held-out forms and titles, checked: the shares of the right form
        and rhyme, and of tone positions right on the poems of the right form."""
        examples = self.parallel.shard(self.data.val_writing_examples[:self.cfg.max_questions or None])
        requests = [(form_named(example.form), example.question.title) for example in examples]
        with self.autocast(), self.parallel.whole_model(loss_module):
            written = write_poems(model, self.fmt, requests, batch_size=self.cfg.batch_size, constrained=False,
                                  progress=self.heartbeat("validation writing", len(requests)))
        local = rule_counts([candidates[0].check for candidates in written])
        n, form, rhyme, right, checked = self.parallel.sum(
            torch.tensor(local, dtype=torch.float64, device=self.device)).tolist()
        metrics = {"val/writing_form": form / n, "val/writing_rhyme": rhyme / n}
        return metrics | ({"val/writing_tone": right / checked} if checked else {})

    def run(self, loss_module, model) -> dict[str, float]:
        """Metrics for the current weights; leaves the model in eval mode (the loop switches it back)."""
        metrics: dict[str, float] = {}
        loss_module.eval()
        if self.scores_loss:
            metrics.update(self.loss(loss_module, self.loss_dataset))
        if self.scores_writing:
            metrics.update(self.loss(loss_module, self.writing_dataset, "val/writing_"))
        if self.decodes:
            metrics.update(self.decode(loss_module, model))
        if self.writes:
            metrics.update(self.write(loss_module, model))
        return metrics
