"""The refusal margin of a reference row, computed in one packed forward pass per micro-batch.

For a reference prompt b with answer a and refusal texts r_1..r_J, over the first t = `margin_tokens` tokens

    m(b) = log p(a₁..ₜ | b) − log( (1/J) Σ_j p(r_j,₁..ₜ | b) )                (refusals averaged in probability)

Why m rather than the answer's NLL: an update that raises a refusal opening's logit by δ changes log p(a₁ | b)
by only −p(r₁ | b)·δ (near zero while refusing is unlikely) but changes m by about −δ. The reference-gradient
sample of a row is ∇(−m): like an NLL sample it points the way the protected quantity gets worse, so the
projector's one-sided rule (remove what raises the "loss") keeps m from decreasing with no change.

Packing. Every continuation of one row shares its prompt, so they all go into that row: the prompt, then one
position per distinct opening prefix of the continuations (a prefix tree: refusals that open alike share
positions, refusals with equal t-token openings are one continuation with their count as weight). A tree
position attends to the prompt and to its own ancestors (a 4D attention mask) and has the position id it
would have after the prompt. One row per example keeps `reference`'s per-example gradient hooks unchanged
(they sum a row's positions), and a row costs P + (distinct prefixes) tokens instead of (1 + J)·(P + t).
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lora_ogpsa.data.rows import tokenize_prompt_completion


@dataclass
class MarginExample:
    """One reference row's prompt and the opening tokens of its continuations."""

    prompt_ids: list[int]
    answer: tuple[int, ...]
    """The reference answer's first t tokens (≥ 1)."""
    refusals: list[tuple[int, ...]]
    """Distinct refusal openings (≥ 1 token each)."""
    refusal_weights: list[float]
    """Each opening's share of the refusal texts (they sum to 1)."""


@dataclass
class MarginBatch:
    """Reference rows packed for `example_margins` (`make_margin_batches`)."""

    input_ids: torch.Tensor  # (B, T): prompt, then the prefix-tree positions; right-padded
    position_ids: torch.Tensor  # (B, T)
    allowed: torch.Tensor  # (B, T, T) bool: query position may attend to key position
    targets: torch.Tensor  # (N, 4) long: row, position whose logits predict the token, token, continuation
    log_weights: torch.Tensor  # (B, C) float32: log share of refusal c + 1 (−inf: absent); continuation 0 = answer


def margin_example(prompt_ids: Sequence[int], answer_ids: Sequence[int], refusal_ids: Sequence[Sequence[int]], *,
                   tokens: int) -> MarginExample:
    """The continuations of one row cut to their first `tokens` tokens; equal refusal openings merged."""
    counts = Counter(tuple(ids[:tokens]) for ids in refusal_ids)
    if not answer_ids or () in counts:
        raise ValueError("every continuation of the refusal margin needs at least one token")
    return MarginExample(list(prompt_ids), tuple(answer_ids[:tokens]), list(counts),
                         [count / len(refusal_ids) for count in counts.values()])


def tokenize_margin_row(tokenizer: Any, row: Mapping[str, Any], refusals: Sequence[str], *, tokens: int,
                        max_length: int | None) -> MarginExample | None:
    """A reference row (`prompt`/`completion`) and the refusal texts, tokenized as `data.tokenize_prompt_completion`
    does (chat template for conversational rows); None when the prompt leaves no answer token in `max_length`."""
    answer = tokenize_prompt_completion(tokenizer, row, max_length=max_length)
    if not any(answer.completion_mask):
        return None
    prompt = answer.input_ids[:answer.completion_mask.index(1)]
    conversational = isinstance(row["prompt"], list)
    fulls = [tokenize_prompt_completion(tokenizer, {
        "prompt": row["prompt"], "completion": [{"role": "assistant", "content": text}] if conversational else text},
        max_length=None).input_ids for text in refusals]
    # The prompt every continuation shares: a plain-text prompt may merge with a continuation's first
    # characters into one token, and then that token belongs to the continuation.
    shared = min(_common_prefix_length(prompt, full) for full in fulls)
    return margin_example(prompt[:shared], answer.input_ids[shared:], [full[shared:] for full in fulls],
                          tokens=tokens)


def _common_prefix_length(ids: Sequence[int], other: Sequence[int]) -> int:
    return next((index for index, (a, b) in enumerate(zip(ids, other, strict=False)) if a != b),
                min(len(ids), len(other)))


def make_margin_batches(examples: Sequence[MarginExample], *, batch_size: int,
                        pad_token_id: int) -> list[MarginBatch]:
    """Pack examples into micro-batches of `batch_size` rows (one row per example)."""
    return [_pack(examples[start:start + batch_size], pad_token_id) for start in range(0, len(examples), batch_size)]


def _layout(example: MarginExample) -> tuple[list[int], list[int], list[int], list[tuple[int, int, int]]]:
    """(tokens, position ids, parent position of every tree position, targets (position, token, continuation))."""
    prompt = len(example.prompt_ids)
    tokens, positions, parents = list(example.prompt_ids), list(range(prompt)), []
    at_prefix: dict[tuple[int, ...], int] = {(): prompt - 1}  # the position whose logits predict what follows
    targets = []
    for continuation, opening in enumerate([example.answer, *example.refusals]):
        for depth, token in enumerate(opening):
            prefix = opening[:depth]
            if prefix not in at_prefix:
                at_prefix[prefix] = len(tokens)
                parents.append(at_prefix[prefix[:-1]])
                tokens.append(prefix[-1])
                positions.append(prompt + depth - 1)
            targets.append((at_prefix[prefix], token, continuation))
    return tokens, positions, parents, targets


def _pack(examples: Sequence[MarginExample], pad_token_id: int) -> MarginBatch:
    layouts = [_layout(example) for example in examples]
    length = max(len(tokens) for tokens, *_ in layouts)
    continuations = 1 + max(len(example.refusals) for example in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(examples), length), dtype=torch.long)
    allowed = torch.eye(length, dtype=torch.bool).repeat(len(examples), 1, 1)  # padding attends to itself only
    log_weights = torch.full((len(examples), continuations - 1), -torch.inf)
    targets = []
    for row, (example, (tokens, positions, parents, row_targets)) in enumerate(zip(examples, layouts, strict=True)):
        prompt = len(example.prompt_ids)
        input_ids[row, :len(tokens)] = torch.tensor(tokens)
        position_ids[row, :len(tokens)] = torch.tensor(positions)
        allowed[row, :prompt, :prompt] = torch.ones(prompt, prompt, dtype=torch.bool).tril()
        for offset, parent in enumerate(parents):  # a tree position sees what its parent sees, and itself
            allowed[row, prompt + offset] = allowed[row, parent]
            allowed[row, prompt + offset, prompt + offset] = True
        log_weights[row, :len(example.refusals)] = torch.tensor(example.refusal_weights).log()
        targets += [(row, *target) for target in row_targets]
    return MarginBatch(input_ids, position_ids, allowed, torch.tensor(targets, dtype=torch.long), log_weights)


def example_margins(model: nn.Module, batch: MarginBatch) -> torch.Tensor:
    """Each row's refusal margin m, `(B,)` float32, differentiable in the model's weights.

    Raises:
        ValueError: the model's attention implementation ignores custom 4D masks (only `eager` and `sdpa`
            take them).
    """
    attention = getattr(model.config, "_attn_implementation", None) or "eager"
    if attention not in ("eager", "sdpa"):
        raise ValueError(f"the refusal margin needs attn_implementation 'eager' or 'sdpa' (it packs the "
                         f"continuations with a 4D attention mask), the model uses {attention!r}")
    device = next(model.parameters()).device
    rows, positions, tokens, continuations = batch.targets.to(device).unbind(1)  # (N,) each
    dtype = model.get_input_embeddings().weight.dtype
    mask = torch.zeros(batch.allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~batch.allowed.to(device), torch.finfo(dtype).min)
    inputs = {"input_ids": batch.input_ids.to(device), "position_ids": batch.position_ids.to(device),
              "attention_mask": mask[:, None], "use_cache": False}  # (B, 1, T, T): additive, as eager wants it
    keep = torch.zeros(batch.input_ids.shape, dtype=torch.bool, device=device)
    keep[rows, positions] = True
    logits = _kept_logits(model, inputs, keep)  # (K, V): the kept positions, row-major
    kept_index = (keep.flatten().cumsum(0) - 1).view(keep.shape)[rows, positions]  # (N,)
    log_probs = logits[kept_index, tokens] - torch.logsumexp(logits, dim=-1)[kept_index]  # (N,)
    sums = torch.zeros((keep.shape[0], batch.log_weights.shape[1] + 1), device=device)  # (B, C)
    sums = sums.index_put((rows, continuations), log_probs, accumulate=True)
    refusal = torch.logsumexp(sums[:, 1:] + batch.log_weights.to(device), dim=1)  # log mean_j p(r_j)
    return sums[:, 0] - refusal


def _kept_logits(model: nn.Module, inputs: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """Float32 logits at the `keep (B, T)` positions, `(K, V)` row-major; computed only there when the model
    takes a boolean `logits_to_keep` (transformers ≥ 5)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "logits_to_keep" in inspect.signature(base.forward).parameters:
        logits = model(**inputs, logits_to_keep=keep).logits
        if logits.dim() == 2 and logits.shape[0] == int(keep.sum()):
            return logits.float()
    return model(**inputs).logits[keep].float()
