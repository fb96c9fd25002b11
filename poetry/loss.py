"""Causal-LM loss on target positions only, a chunk of target rows at a time.

The output layer is the largest single cost of a LoRA step on these models (vocabularies of 152k for Qwen, 262k for
Gemma): full logits for a 4x1024 batch are 4096 x 152k floats. Prompts are masked anyway, so the decoder's hidden
states are gathered where labels are learned and only those rows go through lm_head (measured 1.4x faster on
Gemma-3-270M on CPU). The module wraps the PEFT model so that DDP sees one forward and syncs the LoRA gradients.

Even the target rows' logits are large: 1.5k targets x 262k ids is 1.6 GB per fp32 buffer, and cross-entropy keeps
several (logits, log-softmax, their gradient). With `chunk_rows` set, `chunked_cross_entropy` (Liger's fused linear
cross-entropy, in plain torch) turns each chunk's logits into its loss and, when a gradient is wanted, at once into
the gradient w.r.t. its hidden rows, then frees them; backward only scales that stored gradient. Chosen over
torch.utils.checkpoint per chunk, which recomputes each chunk's lm_head matmul in backward and keeps its log-softmax
and gradient too: on Gemma-3-270M's output layer (1307 target rows, fp32, 2 CPU cores) in chunks of 256 rows it was
1.7x slower than this and used 3.5x the memory (0.94 GB against 0.27 GB).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .model import VirtualTokens
from .prompt import IGNORE_INDEX


class TargetOnlyLoss(nn.Module):
    """forward(batch) -> (sum of token losses, number of target tokens) over the batch. `chunk_rows` > 0 bounds the
    output layer's memory to that many target rows' logits at once (0: all target rows at once)."""

    def __init__(self, model: nn.Module, chunk_rows: int = 0):
        super().__init__()
        self.model = model  # a PeftModel (or any HF causal LM)
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.decoder = causal_lm.get_decoder()
        self.lm_head = causal_lm.get_output_embeddings()
        self.chunk_rows = chunk_rows
        self.virtual = VirtualTokens.of(model)  # prompt, P- or prefix tuning: trained tokens before each sequence
        config = causal_lm.config
        self.softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3: cap * tanh(logits / cap)
        self.logit_scale = getattr(config, "logit_scale", None)  # Cohere-style scaled logits

    def target_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        if self.logit_scale:
            logits = logits * self.logit_scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The decoder's last hidden states, (B, T, hidden), a prompt-learning adapter's virtual tokens before."""
        if self.virtual:
            return self.virtual.hidden_states(self.decoder, input_ids, attention_mask)
        return self.decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    @staticmethod
    def target_rows(hidden: torch.Tensor, labels: torch.Tensor):
        """(the hidden states where a target is predicted, (target tokens, hidden) instead of (B, T, hidden); the
        targets after the causal shift, (B, T - 1); the mask of learned ones)."""
        targets = labels[:, 1:]
        learned = targets != IGNORE_INDEX
        return hidden[:, :-1][learned], targets, learned

    def token_logprobs(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(each target token's log-probability, the row it belongs to). Every target row's logits at once: meant
        for short continuations (an emotion option's few tokens)."""
        rows, targets, learned = self.target_rows(hidden, labels)
        logprobs = self.target_logits(rows).log_softmax(-1).gather(1, targets[learned].unsqueeze(1)).squeeze(1)
        return logprobs, learned.nonzero()[:, 0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                choice_labels: torch.Tensor | None = None, choice_right: torch.Tensor | None = None,
                choice_chars: torch.Tensor | None = None):
        """(summed LM loss, target tokens), and the summed choice loss third when the batch has option rows."""
        hidden = self.hidden_states(input_ids, attention_mask)
        rows, targets, learned = self.target_rows(hidden, labels)
        # chunking reads lm_head's weight and bias directly, so any other output layer (an adapter on lm_head)
        # runs whole through its own forward
        if self.chunk_rows and type(self.lm_head) is nn.Linear:
            loss_sum = chunked_cross_entropy(rows, self.lm_head.weight, self.lm_head.bias, targets[learned],
                                             self.chunk_rows, self.logit_scale, self.softcap)
        else:
            loss_sum = F.cross_entropy(self.target_logits(rows), targets[learned], reduction="sum")
        if choice_labels is None:
            return loss_sum, learned.sum()
        return loss_sum, learned.sum(), self.choice_loss(hidden, choice_labels, choice_right, choice_chars)

    def choice_loss(self, hidden: torch.Tensor, choice_labels: torch.Tensor, right: torch.Tensor,
                    chars: torch.Tensor) -> torch.Tensor:
        """T-Few's rank classification (Liu et al., NeurIPS 2022), summed over the emotion examples: cross-entropy
        over the four options' log-likelihoods per character (the right one must win, as likelihood_norm picks),
        plus unlikelihood on the distractors' tokens, -log(1 - p), averaged over each example's distractor tokens.
        The option rows are the batch's last 4 x examples rows, four an example in letter order."""
        logprobs, row = self.token_logprobs(hidden, choice_labels)
        examples = len(right)
        first = hidden.shape[0] - 4 * examples
        example, option = (row - first) // 4, (row - first) % 4
        sums = logprobs.new_zeros(examples, 4).index_put_((example, option), logprobs, accumulate=True)
        rank = F.cross_entropy(sums / chars, right, reduction="sum")
        distractor = option != right[example]
        unlikely = -torch.log1p(-logprobs[distractor].exp().clamp(max=1 - 1e-6))  # p = 1 would be log(0)
        per_example = logprobs.new_zeros(examples).index_add(0, example[distractor], unlikely)
        tokens = logprobs.new_zeros(examples).index_add(0, example[distractor], torch.ones_like(unlikely))
        return rank + (per_example / tokens).sum()


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          targets: torch.Tensor, chunk_rows: int, logit_scale: float | None = None,
                          softcap: float | None = None) -> torch.Tensor:
    """The sum over rows of cross_entropy(TargetOnlyLoss.target_logits(hidden), targets), `chunk_rows` rows at a
    time: never more than one chunk's logits exist. Gradients flow to hidden, and to weight and bias if they
    require grad; under torch.no_grad (evaluation) none is computed."""
    return _ChunkedCrossEntropy.apply(hidden, weight, bias, targets, chunk_rows, logit_scale, softcap,
                                      torch.is_grad_enabled())


def matmul_dtype(device_type: str, weight: torch.Tensor) -> torch.dtype:
    """The dtype lm_head(hidden) multiplies in: autocast's where it is on (it casts a linear layer's inputs to
    bf16/fp16, fast on tensor cores and native-bf16 CPUs), else the weight's own."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, when wanted, its gradients chunk by chunk (no matmul is recomputed in
    backward); backward multiplies them by the incoming scalar gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows, logit_scale, softcap, grad_enabled):
        # ctx.needs_input_grad ignores torch.no_grad, so the caller says whether grad mode was on
        wants_hidden, wants_weight, wants_bias = (grad_enabled and needs for needs in ctx.needs_input_grad[:3])
        device_type = hidden.device.type
        dtype = matmul_dtype(device_type, weight)
        weight_c = weight.to(dtype)  # cast once, not per chunk; a no-op in fp32
        bias_c = bias.to(dtype) if bias is not None else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if wants_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants_weight else None  # summed over chunks
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if wants_bias else None
        # autocast off and every dtype explicit: the matmuls in `dtype` as lm_head's under autocast, all else fp32
        with torch.autocast(device_type, enabled=False):
            for start in range(0, hidden.size(0), chunk_rows):
                rows = slice(start, start + chunk_rows)
                hidden_c = hidden[rows].to(dtype)
                loss_c, grad_logits = _chunk_loss(F.linear(hidden_c, weight_c, bias_c), targets[rows], logit_scale,
                                                  softcap, wants_gradient=wants_hidden or wants_weight or wants_bias)
                loss += loss_c
                if grad_logits is None:
                    continue
                if wants_hidden:
                    grad_hidden[rows] = grad_logits.to(dtype) @ weight_c
                if wants_weight:
                    _add_product(grad_weight, grad_logits.t().to(dtype), hidden_c)
                if wants_bias:
                    grad_bias += grad_logits.sum(0)
                del grad_logits  # freed before the next chunk's logits are allocated, not after
        ctx.grads = (grad_hidden, _to(grad_weight, weight), _to(grad_bias, bias))
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        scaled = tuple(None if grad is None else grad * grad_loss for grad in ctx.grads)
        return (*scaled, None, None, None, None, None)


def _chunk_loss(logits: torch.Tensor, targets: torch.Tensor, logit_scale: float | None, softcap: float | None,
                wants_gradient: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(summed loss, gradient w.r.t. the raw logits or None) of one chunk, from its lm_head output. Works in place on
    fp32 buffers of (chunk, vocab): one, and a second one when softcapping."""
    logits = logits.float()  # as target_logits: the softmax in fp32 whatever the matmul's dtype
    if logit_scale:
        logits.mul_(logit_scale)
    tanh = None
    if softcap:
        tanh = logits.div_(softcap).tanh_()  # kept: the softcap's derivative is 1 - tanh^2
        logits = tanh * softcap
    picked = targets.unsqueeze(1)
    target_logit = logits.gather(1, picked).squeeze(1)
    peak = logits.amax(1, keepdim=True)
    exp = logits.sub_(peak).exp_()  # softmax's numerator, in the logits' buffer
    total = exp.sum(1, keepdim=True)
    loss = (peak + total.log()).squeeze(1).sub_(target_logit).sum()  # logsumexp - the target's logit
    if not wants_gradient:
        return loss, None
    grad = exp.div_(total).scatter_add_(1, picked, torch.full_like(target_logit, -1.0).unsqueeze(1))  # p - onehot
    if tanh is not None:
        grad = tanh.square_().neg_().add_(1).mul_(grad)
    if logit_scale:
        grad.mul_(logit_scale)
    return loss, grad


def _add_product(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """total += a @ b; in place when the dtypes match, so a weight-sized product is not allocated per chunk."""
    if a.dtype == total.dtype:
        total.addmm_(a, b)
    else:
        total += a @ b


def _to(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    return None if grad is None else grad.to(like.dtype)


def full_logits_loss(model: nn.Module, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: the model's own full logits, summed over target tokens. Tests check TargetOnlyLoss against it
    and bench/loss.py times both; training and validation use TargetOnlyLoss."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum",
                               ignore_index=IGNORE_INDEX)
    return loss_sum, (targets != IGNORE_INDEX).sum()
