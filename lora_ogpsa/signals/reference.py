"""Per-example reference gradients of every LoRA tensor, from one forward/backward per micro-batch.

For a LoRA layer `y = W x + s · B A x`, hooks capture the input of lora_A (x_i, T×d_in), the input of lora_B
(h_i = A x_i, T×r) and the gradients at their outputs. Example i's gradients are then

    ∇B_i = g_B,iᵀ h_i        g_B,i = ∂L/∂(B h_i)  (T×d_out; already holds the scaling s)
    ∇A_i = g_A,iᵀ x_i        g_A,i = ∂L/∂(A x_i)  (T×r)

which is docs/STACK.md's `∇B_i = s·δ_iᵀ (x_i Aᵀ)`, `∇A_i = s·(Bᵀ δ_iᵀ) x_i`, read off autograd instead of
rebuilt. The loss is the sum over examples of each example's mean NLL on its response tokens, so example i's
gradient is exactly ∇ of its own loss. Hooks are attached to the forward call that builds the autograd graph,
so this works with gradient checkpointing (reentrant or not) and on a 4-bit base.

`collect_reference_samples` holds all S samples of every tensor; `collect_reference_sketch` (what a refresh
uses) adds each micro-batch's samples into a bounded Frequent Directions sketch (`sketch.GradientSketch`).
A micro-batch may also be a `margin.MarginBatch`: its rows' samples are then gradients of the negated refusal
margin −m (`OGPSAConfig.reference_objective`), from the same hooks and the same one backward per micro-batch.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lora_ogpsa.core.sketch import GradientSketch
from lora_ogpsa.data.rows import TokenizedExample, as_prompt_completion, fingerprint, read_rows, tokenize_rows
from lora_ogpsa.signals.margin import MarginBatch, example_margins, make_margin_batches, tokenize_margin_row

logger = logging.getLogger(__name__)


@dataclass
class ReferenceBatch:
    """A right-padded micro-batch of reference examples."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    loss_weights: torch.Tensor  # (B, T-1): weight of predicting token t+1 from position t; 0 off the response


@dataclass
class ReferenceSet:
    """The tokenized reference examples used for every refresh, and what names them."""

    batches: list[ReferenceBatch]
    rows: int
    source: str
    fingerprint: str
    margin_batches: list[MarginBatch] = field(default_factory=list)
    """The same rows packed for the refusal margin (built when `reference_objective` is not `nll`)."""

    @property
    def metadata(self) -> dict[str, str]:
        """What the subspace file records about its reference set."""
        return {"reference_hash": self.fingerprint, "reference": self.source}


def build_reference_set(source: Any, tokenizer: Any, config: Any = None, *, max_length: int | None = 512,
                        seed: int = 0, flag: str = "--reference") -> ReferenceSet:
    """The reference batches `OGPSACallback` needs, from a file, a list of rows or a `datasets.Dataset`.

    Rows are TRL's SFT formats (`messages`, or `prompt`/`completion`), validated as `data.read_rows` does.
    `config` (an `OGPSAConfig`; default settings when None) decides how many rows are used
    (`reference_examples`, a seeded sample when there are more), the micro-batch size
    (`reference_batch_size`) and the token weighting (`opening_tokens`, `later_token_weight`); with
    `reference_objective` `refusal_margin` or `both` the same rows are also packed for the refusal margin
    (`margin_tokens`, `margin_refusals`). Tokenization is exactly TRL's SFTTrainer's (loss on the response
    only); rows whose prompt fills `max_length` are dropped.

    Raises:
        InputError: unreadable or invalid rows, or none left after truncation.
    """
    if config is None:
        from lora_ogpsa.config import OGPSAConfig

        config = OGPSAConfig()
    rows = read_rows(source, "sft", flag=flag)
    wanted = config.reference_examples
    if len(rows) < wanted:
        logger.warning("%s %s has %d rows, fewer than reference_examples=%d: using all of them", flag,
                       rows.source, len(rows), wanted)
    chosen = rows.rows if len(rows) <= wanted else random.Random(seed).sample(rows.rows, wanted)
    examples = tokenize_rows(tokenizer, chosen, max_length=max_length, source=f"{flag} {rows.source}")
    batches = make_batches(examples, batch_size=config.reference_batch_size, pad_token_id=tokenizer.pad_token_id,
                           opening_tokens=config.opening_tokens, later_token_weight=config.later_token_weight)
    reference = ReferenceSet(batches, len(examples), rows.source, fingerprint(examples))
    if config.reference_objective != "nll":
        reference.margin_batches = _margin_batches(tokenizer, chosen, config, max_length)
    return reference


def build_lookalike_set(source: Any, tokenizer: Any, config: Any = None, *, max_length: int | None = 512,
                        seed: int = 0, flag: str = "--lookalike") -> ReferenceSet:
    """The look-alike rows `OGPSAConfig.lookalike_barrier` constrains: benign prompts that sound harmful, each
    with the answer to keep, in TRL's SFT formats (as `build_reference_set` reads them), packed for the refusal
    margin (`margin_batches`: `margin_tokens`, `margin_refusals`); `lookalike_examples` rows (a seeded sample
    when there are more). Take them from training or reference banks, never from an evaluation suite."""
    import dataclasses

    from lora_ogpsa.config import OGPSAConfig

    config = config or OGPSAConfig()
    margin_config = dataclasses.replace(config, reference_examples=config.lookalike_examples,
                                        reference_objective="refusal_margin", one_sided=False)
    lookalike = build_reference_set(source, tokenizer, margin_config, max_length=max_length, seed=seed, flag=flag)
    if not lookalike.margin_batches:
        from lora_ogpsa.utils.errors import InputError

        raise InputError(f"{flag} {lookalike.source}: no row leaves an answer token within --max_length "
                         f"{max_length}; give shorter prompts or raise --max_length")
    return lookalike


def _margin_batches(tokenizer: Any, rows: Sequence[dict], config: Any, max_length: int | None) -> list[MarginBatch]:
    from lora_ogpsa.refusal import GENERIC_REFUSALS

    refusals = list(config.margin_refusals or GENERIC_REFUSALS)
    examples = [tokenize_margin_row(tokenizer, as_prompt_completion(row), refusals, tokens=config.margin_tokens, max_length=max_length)
                for row in rows]
    return make_margin_batches([example for example in examples if example is not None],
                               batch_size=config.reference_batch_size, pad_token_id=tokenizer.pad_token_id)


def make_batches(examples: Sequence[TokenizedExample], *, batch_size: int, pad_token_id: int,
                 opening_tokens: int = 0, later_token_weight: float = 1.0) -> list[ReferenceBatch]:
    """Pad examples into micro-batches and weight each response token (the first `opening_tokens` of every
    response get weight 1, the rest `later_token_weight`; `opening_tokens = 0` weights all equally)."""
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        length = max(len(example.input_ids) for example in chunk)
        input_ids = torch.full((len(chunk), length), pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), length), dtype=torch.long)
        weights = torch.zeros((len(chunk), length), dtype=torch.float32)
        for row, example in enumerate(chunk):
            size = len(example.input_ids)
            input_ids[row, :size] = torch.tensor(example.input_ids)
            attention[row, :size] = 1
            weights[row, :size] = _token_weights(example.completion_mask, opening_tokens, later_token_weight)
        batches.append(ReferenceBatch(input_ids, attention, weights[:, 1:]))
    return batches


def _token_weights(mask: Sequence[int], opening_tokens: int, later_token_weight: float) -> torch.Tensor:
    response = torch.tensor(mask, dtype=torch.float32)
    if opening_tokens == 0:
        return response
    rank = response.cumsum(0)  # 1 for the first response token, 2 for the second, ...
    return torch.where(rank <= opening_tokens, response, response * later_token_weight)


def example_losses(model: nn.Module, batch: ReferenceBatch) -> torch.Tensor:
    """Each example's weighted mean NLL over its response tokens, `(B,)` float32.

    Logits are computed for the weighted positions only where the model takes a boolean `logits_to_keep`
    (transformers ≥ 5): the prompt's logits, unused, cost no memory (the (B, T, V) logits and their gradient are
    the largest activations of a small model).
    """
    device = next(model.parameters()).device
    input_ids, weights = batch.input_ids.to(device), batch.loss_weights.to(device)  # (B, T), (B, T-1)
    inputs = {"input_ids": input_ids, "attention_mask": batch.attention_mask.to(device), "use_cache": False}
    used = weights > 0  # (B, T-1): positions whose next token is weighted
    if _takes_logits_to_keep(model):
        keep = torch.cat([used, used.new_zeros(used.shape[0], 1)], dim=1)  # (B, T)
        logits = model(**inputs, logits_to_keep=keep).logits.float()  # (N, V): the kept positions, row-major
        if logits.dim() == 2 and logits.shape[0] == int(used.sum()):
            nll = nn.functional.cross_entropy(logits, input_ids[:, 1:][used], reduction="none")  # (N,)
            rows = torch.arange(used.shape[0], device=device)[:, None].expand_as(used)[used]  # (N,)
            total = torch.zeros(used.shape[0], device=device).index_add(0, rows, nll * weights[used])
            return total / weights.sum(-1).clamp_min(1e-12)
    logits = model(**inputs).logits[:, :-1].float()  # (B, T-1, V)
    nll = nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")  # (B, T-1)
    return (nll * weights).sum(-1) / weights.sum(-1).clamp_min(1e-12)


def _takes_logits_to_keep(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


@dataclass
class _LoraPair:
    """The lora_A and lora_B modules of one LoRA layer and their names in the adapter file."""

    lora_a: nn.Module
    lora_b: nn.Module
    name_a: str
    name_b: str


def find_lora_pairs(model: nn.Module, parameters: Mapping[str, torch.nn.Parameter],
                    adapter_name: str = "default") -> list[_LoraPair]:
    """The (lora_A, lora_B) modules behind the given parameters (keyed as in the adapter file)."""
    name_by_id = {id(parameter): name for name, parameter in parameters.items()}
    pairs = []
    for module in model.modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_a, nn.ModuleDict) or adapter_name not in lora_a:
            continue
        a, b = lora_a[adapter_name], lora_b[adapter_name]
        name_a, name_b = name_by_id.get(id(a.weight)), name_by_id.get(id(b.weight))
        if name_a is not None and name_b is not None:
            pairs.append(_LoraPair(a, b, name_a, name_b))
    found = {name for pair in pairs for name in (pair.name_a, pair.name_b)}
    missing = sorted(set(parameters) - found)
    if missing:
        raise ValueError(f"no LoRA layer found for {len(missing)} parameters, e.g. {missing[0]}; only plain "
                         "lora_A/lora_B linear adapters are supported")
    return pairs


class _PerExampleGradients:
    """Forward hooks on lora_A / lora_B that turn output gradients into per-example weight gradients."""

    def __init__(self, pairs: Sequence[_LoraPair]) -> None:
        self.rows_by_name: dict[str, torch.Tensor] = {}  # (B, *shape) per name: where this micro-batch's go
        self.handles = []
        for pair in pairs:
            self.handles.append(pair.lora_a.register_forward_hook(self._hook(pair.name_a)))
            self.handles.append(pair.lora_b.register_forward_hook(self._hook(pair.name_b)))

    def _hook(self, name: str):
        def forward_hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            # Under reentrant checkpointing the first forward runs without grad; the recomputation in
            # backward builds the graph and fires this hook again.
            if output.requires_grad:
                held = [inputs[0].detach()]  # released once used: the graph outlives the backward pass
                output.register_hook(lambda grad: self._accumulate(name, grad, held.pop()))
        return forward_hook

    @torch.no_grad()
    def _accumulate(self, name: str, grad: torch.Tensor, layer_input: torch.Tensor) -> None:
        batch = grad.shape[0]
        grad = grad.reshape(batch, -1, grad.shape[-1]).float()  # (B, T, out)
        layer_input = layer_input.reshape(batch, -1, layer_input.shape[-1]).float()  # (B, T, in)
        self.rows_by_name[name] += torch.einsum("bto,bti->boi", grad, layer_input)  # (B, out, in)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def collect_reference_samples(
    model: nn.Module,
    batches: Sequence[ReferenceBatch | MarginBatch],
    parameters: Mapping[str, torch.nn.Parameter],
    *,
    adapter_name: str = "default",
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One reference-gradient sample per example for every LoRA tensor, all of them held (S × n × 4 bytes;
    `collect_reference_sketch` holds a bounded sketch instead).

    Args:
        model: the PEFT model (any base: full precision or 4-bit; gradient checkpointing on or off).
        batches: padded reference micro-batches (`make_batches`; or `margin.make_margin_batches`, whose
            samples are ∇(−m) and losses −m); may be empty.
        parameters: the trainable LoRA weights, keyed as in the adapter file (`model.lora_parameters`).
        adapter_name: the adapter whose lora_A / lora_B modules the parameters belong to.
        progress: show a progress bar.

    Returns:
        (samples_by_name, losses): `(S, *param_shape)` float32 per name, S = total examples, on the
        parameters' device; and each example's reference loss `(S,)` (CPU).

    The model's state is restored on exit, also on error: hooks removed, `.grad` of every parameter, dropout
    modules' train/eval mode.
    """
    total = sum(batch.input_ids.shape[0] for batch in batches)
    samples_by_name = {name: torch.zeros((total, *parameter.shape), dtype=torch.float32, device=parameter.device)
                       for name, parameter in parameters.items()}
    offsets = iter(itertools.accumulate((batch.input_ids.shape[0] for batch in batches), initial=0))

    def rows_for(size: int) -> dict[str, torch.Tensor]:
        start = next(offsets)
        return {name: samples[start:start + size] for name, samples in samples_by_name.items()}

    losses = _per_example_backward(model, batches, parameters, rows_for, adapter_name=adapter_name,
                                   progress=progress)
    return samples_by_name, losses


def collect_reference_sketch(
    model: nn.Module,
    batches: Sequence[ReferenceBatch | MarginBatch],
    parameters: Mapping[str, torch.nn.Parameter],
    *,
    rows: int,
    adapter_name: str = "default",
    progress: bool = True,
) -> tuple[GradientSketch, torch.Tensor]:
    """Per-example reference gradients reduced as they are produced: a Frequent Directions sketch of ℓ = `rows`
    rows per LoRA tensor (ℓ × LoRA parameters × 4 bytes, whatever the number of examples S), from which
    `sketch.subspace(...)` gives the bases; with S ≤ ℓ exactly those of `collect_reference_samples` +
    `compute_subspace`.

    Args and restored state: as `collect_reference_samples`; every micro-batch must hold at most ℓ/2 examples.

    Returns:
        (sketch, losses): the `GradientSketch` and each example's reference loss `(S,)` (CPU).
    """
    total = sum(batch.input_ids.shape[0] for batch in batches)
    sketch = GradientSketch(parameters, rows=max(min(rows, total), 2))  # fewer samples than rows: hold just them
    losses = _per_example_backward(model, batches, parameters, sketch.block_, sketch.commit_,
                                   adapter_name=adapter_name, progress=progress)
    return sketch, losses


def _per_example_backward(model: nn.Module, batches: Sequence[ReferenceBatch | MarginBatch],
                          parameters: Mapping[str, torch.nn.Parameter], rows_for, done=None, *,
                          adapter_name: str, progress: bool) -> torch.Tensor:
    """For each micro-batch: `rows_for(B)` gives zeroed `(B, *shape)` rows per name, one forward/backward adds
    the examples' gradients into them, then `done()`. Returns the per-example losses `(S,)` (CPU)."""
    losses = [torch.zeros(0)]
    hooks = _PerExampleGradients(find_lora_pairs(model, parameters, adapter_name))
    try:
        with _stashed_grads(model), _dropout_off(model):
            for batch in tqdm(batches, desc="reference gradients", leave=False, **({} if progress else {"disable": True})):
                hooks.rows_by_name = rows_for(batch.input_ids.shape[0])
                losses.append(_backward(model, batch))
                if done is not None:
                    done()
    finally:
        hooks.remove()
        hooks.rows_by_name = {}
    return torch.cat(losses)


def _backward(model: nn.Module, batch: ReferenceBatch | MarginBatch) -> torch.Tensor:
    """One micro-batch's forward/backward; its own function so that the graph, and the layer inputs the hooks
    hold in it, are freed before the next micro-batch's forward (measured: +300 MiB at SmolLM2-135M scale).
    A margin batch's loss is −m: a sample points the way the margin falls, as an NLL sample does the loss."""
    if isinstance(batch, MarginBatch):
        example_loss = -example_margins(model, batch)  # (B,)
    else:
        example_loss = example_losses(model, batch)  # (B,)
    example_loss.sum().backward()
    return example_loss.detach().float().cpu()


@contextlib.contextmanager
def _stashed_grads(model: nn.Module) -> Iterator[None]:
    """Set aside every `.grad` (the trainer's accumulated gradients) and put it back afterwards."""
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    stashed = [parameter.grad for parameter in parameters]
    for parameter in parameters:
        parameter.grad = None
    try:
        yield
    finally:
        for parameter, grad in zip(parameters, stashed, strict=True):
            parameter.grad = grad


@contextlib.contextmanager
def _dropout_off(model: nn.Module) -> Iterator[None]:
    """Deterministic reference gradients: dropout modules in eval mode, the model itself left as it is (so that
    gradient checkpointing, active only in train mode, keeps saving memory)."""
    dropouts = [module for module in model.modules() if isinstance(module, nn.Dropout) and module.training]
    for module in dropouts:
        module.eval()
    try:
        yield
    finally:
        for module in dropouts:
            module.train()
