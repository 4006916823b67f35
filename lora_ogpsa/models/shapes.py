"""The base model's linear layers read from its safetensors headers (no weights loaded): to check LoRA
targets and rank before any work starts."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from lora_ogpsa.models.loading import LORA_TENSOR_MARKERS, weight_files
from lora_ogpsa.utils.errors import InputError
from lora_ogpsa.utils.files import ADAPTER_CONFIG, ADAPTER_FILE, read_json, safetensors_header

# PEFT's "all-linear" leaves the output layer out; embeddings are 2-D weights too but no Linear.
_NOT_LINEAR = ("embed", "lm_head", "wte", "wpe")
_PEFT_PREFIX = "base_model.model."  # PEFT's saved keys: base_model.model.<module>.lora_A.weight


def linear_shapes(model_dir: Path, *, with_embeddings: bool = False) -> dict[str, tuple[int, int]]:
    """Module path (without `.weight`) → (out, in) of every 2-D `.weight` that is a linear layer's (and, with
    `with_embeddings`, the embeddings' and output layer's too)."""
    shapes: dict[str, tuple[int, int]] = {}
    config = read_json(model_dir / "config.json", flag="--model")
    if isinstance(config, dict) and config.get("quantization_config"):
        return shapes  # pre-quantized weights are packed: their stored shapes are not the layers'
    for path, _ in weight_files(model_dir):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                shape = handle.get_slice(key).get_shape()
                module = key.removesuffix(".weight")
                linear = with_embeddings or not _not_linear(module)
                if key.endswith(".weight") and len(shape) == 2 and linear:
                    shapes[module] = (int(shape[0]), int(shape[1]))
    return shapes


def _not_linear(module: str) -> bool:
    return any(part in module for part in _NOT_LINEAR)


def check_lora_targets(model_dir: Path, targets: list[str] | None, rank: int) -> None:
    """Every named target module exists in the model, and the rank fits every targeted layer (r ≤ its smaller
    dimension; a larger r gives a rank-deficient adapter and a wrong OGPSA subspace).

    Raises:
        InputError: naming the flag, the module and what the model has.
    """
    shapes = linear_shapes(model_dir)
    if not shapes:
        return  # an architecture whose names this reading does not know: PEFT's own check stands
    names = sorted({module.rsplit(".", 1)[-1] for module in shapes})
    if targets:
        plain = [target for target in targets if target.replace("_", "").isalnum()]  # regexes are PEFT's to match
        absent = [target for target in plain if target not in names]
        if absent:
            raise InputError(f"--lora_target_modules {' '.join(absent)}: no such linear module in --model "
                             f"{model_dir} (it has {', '.join(names)})")
        shapes = {module: shape for module, shape in shapes.items() if module.rsplit(".", 1)[-1] in plain} or shapes
    module, shape = min(shapes.items(), key=lambda item: min(item[1]))
    if rank > min(shape):
        raise InputError(f"--lora-r {rank} is over the smaller dimension of {module} ({shape[0]} x {shape[1]}) in "
                         f"--model {model_dir}; choose --lora-r <= {min(shape)}")


def check_adapter_fits(model_dir: Path, adapter_dir: Path, *, flag: str = "--adapter") -> None:
    """Every LoRA pair of the adapter sits on a linear layer of the base with the same (out, in): an adapter
    trained on another base is refused before any work, not when PEFT fails to load it into the model.

    Raises:
        InputError: naming the flag, the module, both shapes and the base the adapter names.
    """
    shapes = linear_shapes(model_dir, with_embeddings=True)  # PEFT may put LoRA on lm_head too
    if not shapes:
        return  # an architecture whose names this reading does not know: PEFT's own check stands
    tensors = {name: shape for name, (shape, _) in safetensors_header(adapter_dir / ADAPTER_FILE, flag=flag).items()}
    config = read_json(adapter_dir / ADAPTER_CONFIG, flag=flag)
    named_base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    for name, a_shape in sorted(tensors.items()):
        if LORA_TENSOR_MARKERS[0] not in name or len(a_shape) != 2:
            continue  # lora_B pairs were checked with lora_A by check_adapter_dir; conv/embedding LoRA is PEFT's
        module = name.removeprefix(_PEFT_PREFIX).split(LORA_TENSOR_MARKERS[0])[0]
        b_shape = tensors.get(name.replace(*LORA_TENSOR_MARKERS))
        if b_shape is None or len(b_shape) != 2:
            continue  # an incomplete pair is check_adapter_dir's to name
        adapter_shape = (int(b_shape[0]), int(a_shape[1]))
        if module not in shapes and _not_linear(module):
            continue  # e.g. an lm_head tied to the embeddings has no weight of its own in the file
        if shapes.get(module) != adapter_shape:
            found = "no such linear layer" if module not in shapes else "{} x {}".format(*shapes[module])
            raise InputError(f"{flag} {adapter_dir}: its {module} is {adapter_shape[0]} x {adapter_shape[1]}, "
                             f"--model {model_dir} has {found}; the adapter was trained on another base "
                             f"({named_base or 'not named in its ' + ADAPTER_CONFIG}) — give that base as --model")
