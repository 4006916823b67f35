"""A 7B-shaped workload: Llama-2-7B's shapes (hidden 4096, MLP 11008, 32 heads, vocab 32000) with random
weights built in code (no download), every decoder linear in 4-bit NF4, LoRA r = 16 on all of them (1.25 M LoRA
parameters per layer, 39.98 M for the 32 layers of the real model).

Measured next to plain LoRA: one training step, one projection (update and grad mode, k = 8), one refresh
(per-example reference gradients of S examples into the sketch, then the bases), and peak memory of each
(CUDA: `max_memory_allocated` above the loaded model; CPU: peak RSS). Every per-layer quantity (LoRA
parameters, bases, sketch, snapshot, projection time) scales with the layer count; the 32-layer value is
stated next to the measured one. On the CPU the model does not fit whole: `--layers` (default 2) sets how many.

    python -m benchmarks.llama7b                 # CPU: 2 layers, 1 × 32 tokens, S = 8 (about a minute)
    python -m benchmarks.llama7b --layers 32     # CUDA default: the full 32 layers, 4 × 512 tokens, S = 32

Not part of `make test` or `make bench` (too heavy); `make gpu-check` runs it on a GPU.
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import PeakMemory, median_seconds, parser, table, write_json
from benchmarks.workload import Workload, reference_batches, training_batch

LLAMA_7B = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
            "num_key_value_heads": 32, "max_position_embeddings": 4096, "tie_word_embeddings": False}
FULL_LAYERS = 32


def build_model(layers: int, device: torch.device, *, rank: int, checkpointing: bool, seed: int = 0):
    """The 7B-shaped base with `layers` decoder layers in 4-bit NF4 and a fresh LoRA on every decoder linear.

    Built on the meta device and materialised one linear at a time (random weights quantized where they are
    made), so that no full-precision copy of the model ever exists. lora_B is nudged off zero, as after a few
    steps, so that every LoRA tensor has a reference gradient.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_ogpsa.models.loading import attach_lora, disable_cpu_repack_, lora_config, lora_parameters

    torch.manual_seed(seed)
    config = LlamaConfig(**LLAMA_7B, num_hidden_layers=layers)
    compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    _quantize_decoder_linears_(model, device, compute_dtype)
    _materialise_rest_(model, config, device)
    model.is_loaded_in_4bit = True  # what transformers' bitsandbytes loader sets; PEFT and lora_ogpsa read it
    disable_cpu_repack_(model)
    model = attach_lora(model, lora_config(r=rank, dropout=0.0), seed=seed, gradient_checkpointing=checkpointing)
    model.train()
    parameters = lora_parameters(model)
    with torch.no_grad():
        for name, parameter in parameters.items():
            if ".lora_B." in name:
                parameter.normal_(0, 1e-3)
    return model, parameters


def _quantize_decoder_linears_(model, device: torch.device, compute_dtype: torch.dtype) -> None:
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for child_name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                              compute_dtype=compute_dtype, compress_statistics=True,
                                              quant_type="nf4", device="meta")
                weight = torch.empty(child.out_features, child.in_features, device=device, dtype=compute_dtype)
                weight.normal_(0, child.in_features ** -0.5)
                quantized.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True,
                                                     quant_type="nf4", module=quantized).to(device)
                setattr(parent, child_name, quantized)


def _materialise_rest_(model, config, device: torch.device) -> None:
    """Embeddings, norms and the output head: float32 random values; rotary frequencies recomputed."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    for module in model.modules():
        if any(tensor.is_meta for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]):
            module.to_empty(device=device, recurse=False)
            with torch.no_grad():
                for parameter in module.parameters(recurse=False):
                    if parameter.dim() == 1:  # a norm's scale
                        parameter.fill_(1.0)
                    else:
                        parameter.normal_(0, 0.02)
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)


class _Memory(PeakMemory):
    def measure(self, function):
        """(result, peak MiB above the memory in use before it, seconds)."""
        self.reset_peak()
        before, start = self.current(), time.perf_counter()
        result = function()
        return result, self.peak() - before, time.perf_counter() - start


def _train_step(model, optimizer, batch, callback=None) -> None:
    from benchmarks.overhead import _Args

    model(**batch).loss.backward()
    if callback is not None:
        callback.on_pre_optimizer_step(_Args(), None, None)
    optimizer.step()
    if callback is not None:
        callback.on_optimizer_step(_Args(), None, None)
    optimizer.zero_grad(set_to_none=True)


def measure(layers: int, device: torch.device, workload: Workload, *, checkpointing: bool,
            reference_batch: int) -> dict:
    from lora_ogpsa.callback.router import OGPSACallback
    from lora_ogpsa.config import OGPSAConfig

    memory = _Memory(device)
    (model, parameters), load_mb, load_seconds = memory.measure(
        lambda: build_model(layers, device, rank=workload.rank, checkpointing=checkpointing))
    batch = training_batch(model.config.vocab_size, workload, device=device)
    optimizer = torch.optim.AdamW(parameters.values(), lr=1e-6)
    _train_step(model, optimizer, batch)  # warm-up: the optimizer state exists from here on
    _, plain_mb, plain_seconds = memory.measure(lambda: _train_step(model, optimizer, batch))
    config = OGPSAConfig(max_directions=workload.k, energy=1.0, reference_examples=workload.reference_examples,
                         reference_batch_size=reference_batch, sketch_rows=workload.sketch_rows)
    callback = OGPSACallback(config, reference_batches(model.config.vocab_size, workload, batch_size=reference_batch),
                             progress=False)
    state = type("State", (), {"global_step": 0})()
    _, refresh_mb, refresh_seconds = memory.measure(
        lambda: callback.on_train_begin(type("Args", (), {"should_save": False})(), state, None, model=model,
                                        optimizer=optimizer))
    _, update_mb, update_seconds = memory.measure(lambda: _train_step(model, optimizer, batch, callback))
    grads = {name: torch.randn_like(parameter) for name, parameter in parameters.items()}
    before = callback.projection.stacked.snapshot(parameters)
    projection = {
        "update": _timed(device, lambda: callback.projection.stacked.project_change_(parameters, before)),
        "grad": _timed(device, lambda: callback.projection.stacked.project_(grads)),
    }
    lora = sum(parameter.numel() for parameter in parameters.values())
    return {"layers": layers, "lora_parameters": lora, "load_mb": load_mb, "load_seconds": load_seconds,
            "plain_step_seconds": plain_seconds, "plain_step_peak_mb": plain_mb,
            "update_step_seconds": update_seconds, "update_step_peak_mb": update_mb,
            "refresh_seconds": refresh_seconds, "refresh_peak_mb": refresh_mb,
            "projection_seconds": projection, "basis_mb": callback.subspace.nbytes / 2**20,
            "sketch_mb": min(workload.sketch_rows, workload.reference_examples) * lora * 4 / 2**20,
            "snapshot_mb": lora * 4 / 2**20,
            "all_samples_mb": workload.reference_examples * lora * 4 / 2**20,
            "directions": callback.subspace.summary()["directions"]}


def _timed(device: torch.device, function, repeats: int = 5) -> float:
    def run():
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return median_seconds(run, repeats=repeats)


def report(result: dict, workload: Workload) -> None:
    scale = FULL_LAYERS / result["layers"]
    per_layer = [("LoRA parameters (M)", result["lora_parameters"] / 1e6, True),
                 ("bases k·n·4 MiB", result["basis_mb"], True),
                 ("sketch min(ℓ, S)·n·4 MiB", result["sketch_mb"], True),
                 ("update snapshot MiB", result["snapshot_mb"], True),
                 ("all S samples (before the sketch) MiB", result["all_samples_mb"], True),
                 ("projection, update mode, ms", result["projection_seconds"]["update"] * 1000, True),
                 ("projection, grad mode, ms", result["projection_seconds"]["grad"] * 1000, True),
                 ("plain LoRA step s", result["plain_step_seconds"], False),
                 ("OGPSA step (update mode) s", result["update_step_seconds"], False),
                 ("refresh s", result["refresh_seconds"], False),
                 ("plain LoRA step peak MiB", result["plain_step_peak_mb"], False),
                 ("OGPSA step peak MiB", result["update_step_peak_mb"], False),
                 ("refresh peak MiB", result["refresh_peak_mb"], False)]
    rows = [[what, value, value * scale if scales else ""] for what, value, scales in per_layer]
    print(f"7B-shaped: {result['layers']} of {FULL_LAYERS} layers, batch {workload.batch_size} × {workload.length} "
          f"tokens, S = {workload.reference_examples} reference examples of {workload.reference_length} tokens, "
          f"k = {workload.k}, ℓ = {workload.sketch_rows}, r = {workload.rank}")
    print(table(["quantity", f"measured ({result['layers']} layers)",
                 f"per-layer quantities × {scale:g} (the 32 layers of the real model)"], rows))
    print("Step and refresh times and peaks are as measured: they also hold the embeddings and the output head "
          "(32000 × 4096), which do not scale with the layers.")


def main() -> None:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--layers", type=int, help="decoder layers (default: 32 on CUDA, 2 on the CPU)")
    arguments.add_argument("--batch-size", type=int, help="training micro-batch (default 4 on CUDA, 1 on the CPU)")
    arguments.add_argument("--length", type=int, help="tokens per example (default 512 on CUDA, 32 on the CPU)")
    arguments.add_argument("--examples", type=int, help="reference examples S (default 32 on CUDA, 8 on the CPU)")
    arguments.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (CUDA default)")
    args = arguments.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    length = args.length or (512 if cuda else 32)
    workload = Workload(batch_size=args.batch_size or (4 if cuda else 1), length=length,
                        reference_examples=args.examples or (32 if cuda else 8), reference_length=length)
    layers = args.layers or (FULL_LAYERS if cuda else 2)
    if args.quick:
        layers, workload = 1, Workload(batch_size=1, length=8, reference_examples=4, reference_length=8)
    result = measure(layers, device, workload, checkpointing=args.checkpointing or cuda,
                     reference_batch=8 if cuda else 4)
    report(result, workload)
    path = write_json("llama7b", {"workload": vars(workload), "device": str(device), **result}, args.output_dir)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
