"""The model and data the training benchmarks run on: SmolLM2-135M-Instruct (4-bit NF4, LoRA r = 16 on every
linear layer) by default, a tiny random Llama with `--quick`. Token ids are random but lengths and the
prompt/response split are realistic; timing does not depend on which tokens they are."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_ogpsa.config import OGPSAConfig
from lora_ogpsa.data.rows import TokenizedExample
from lora_ogpsa.models.loading import attach_lora, load_base_model, lora_config, lora_parameters
from lora_ogpsa.signals.reference import ReferenceBatch, make_batches


@dataclass
class Workload:
    """Sizes of one benchmark run."""

    batch_size: int = 8
    length: int = 96
    """tokens per training example (prompt + response)"""
    reference_examples: int = 64
    reference_length: int = 96
    rank: int = 16
    k: int = 8
    sketch_rows: int = OGPSAConfig().sketch_size
    """ℓ of the reference-gradient sketch (OGPSAConfig's default at k = 8: 2k = 16)"""


QUICK = Workload(batch_size=2, length=16, reference_examples=8, reference_length=16, rank=4, k=2)


def resolve_model(model: str | None, quick: bool) -> Path:
    """`--model`, else a tiny random model (`--quick`), else the embedded SmolLM2-135M-Instruct."""
    if model:
        return Path(model)
    if quick:
        from lora_ogpsa.testing.tiny import save_tiny_model

        return save_tiny_model(Path(tempfile.mkdtemp(prefix="bench-")) / "tiny")
    from lora_ogpsa.demo.assets import ensure_default_model

    return ensure_default_model()


def build_model(path: Path, *, quantize: bool, rank: int, seed: int = 0):
    """Base + fresh LoRA on every linear layer, in train mode, lora_B nudged off zero (as after a few steps,
    so that every LoRA tensor has a reference gradient)."""
    model = attach_lora(load_base_model(path, quantize=quantize), lora_config(r=rank, dropout=0.0), seed=seed,
                        gradient_checkpointing=False)
    model.train()
    parameters = lora_parameters(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in parameters.items():
            if ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 1e-3)
    return model, parameters


def training_batch(vocab_size: int, workload: Workload, seed: int = 0,
                   device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A micro-batch of random tokens on `device`; loss on the second half (the response)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (workload.batch_size, workload.length), generator=generator)
    labels = input_ids.clone()
    labels[:, : workload.length // 2] = -100
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    return {key: value.to(device) for key, value in batch.items()}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously: a timer must not stop before it ends)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_batches(vocab_size: int, workload: Workload, *, batch_size: int = 8, seed: int = 1) -> list[ReferenceBatch]:
    """`workload.reference_examples` random examples of `reference_length` tokens, response = second half."""
    generator = torch.Generator().manual_seed(seed)
    length = workload.reference_length
    examples = [TokenizedExample(torch.randint(0, vocab_size, (length,), generator=generator).tolist(),
                                 [0] * (length // 2) + [1] * (length - length // 2))
                for _ in range(workload.reference_examples)]
    return make_batches(examples, batch_size=batch_size, pad_token_id=0)
