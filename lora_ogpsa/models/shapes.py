"""The base model's linear layers read from its safetensors headers (no weights loaded): to check LoRA
targets and rank before any work starts."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from lora_ogpsa.models.loading import weight_files
from lora_ogpsa.utils.errors import InputError

# PEFT's "all-linear" leaves the output layer out; embeddings are 2-D weights too but no Linear.
_NOT_LINEAR = ("embed", "lm_head", "wte", "wpe")


def linear_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """Module path (without `.weight`) → (out, in) of every 2-D `.weight` that is a linear layer's."""
    shapes: dict[str, tuple[int, int]] = {}
    for path, _ in weight_files(model_dir):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                shape = handle.get_slice(key).get_shape()
                module = key.removesuffix(".weight")
                if key.endswith(".weight") and len(shape) == 2 and not any(part in module for part in _NOT_LINEAR):
                    shapes[module] = (int(shape[0]), int(shape[1]))
    return shapes


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
