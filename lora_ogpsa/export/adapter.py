"""Write adapters the ecosystem loads unchanged, check what was written, and describe it in a model card.

A training output directory (docs/ARCHITECTURE.md, "Files") holds the PEFT adapter (`adapter_model.safetensors`,
`adapter_config.json`), the OGPSA subspace sidecar, the run config, a model card and the metrics. Everything
is written into a temporary sibling and renamed when complete; after writing, the tensors are read back and
compared with the ones in memory.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from lora_ogpsa.core.subspace import Subspace
from lora_ogpsa.export.card import write_model_card
from lora_ogpsa.models.loading import check_adapter_numbers
from lora_ogpsa.utils.errors import InputError
from lora_ogpsa.utils.files import (
    ADAPTER_CONFIG,
    ADAPTER_FILE,
    CARD_FILE,
    METRICS_FILE,
    RUN_CONFIG,
    SUBSPACE_FILE,
    TOKENIZER_FILES,
    read_json,
    read_jsonl,
    read_safetensors,
    write_json,
)
from lora_ogpsa.utils.outputs import atomic_directory, check_output_dir, output_path

logger = logging.getLogger(__name__)











def save_adapter(model: torch.nn.Module, directory: Path, adapter_name: str = "default") -> None:
    """Save one adapter (PEFT format) and check the file against the tensors in memory."""
    model.save_pretrained(str(directory), selected_adapters=[adapter_name], safe_serialization=True)
    saved_dir = directory if adapter_name == "default" else directory / adapter_name
    from lora_ogpsa.models.loading import lora_parameters

    expected = {name: parameter.detach() for name, parameter in lora_parameters(model, adapter_name).items()}
    verify_adapter_file(saved_dir / ADAPTER_FILE, expected)


def verify_adapter_file(path: Path, expected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Read an adapter file back: every expected tensor present and equal; warn about suspicious content.

    Returns:
        The tensors read from the file.

    Raises:
        RuntimeError: a tensor is missing or differs (the write went wrong).
    """
    tensors = read_safetensors(path, flag="adapter")
    for name, value in expected.items():
        if name not in tensors:
            raise RuntimeError(f"{path}: tensor {name} missing after writing")
        if not torch.equal(tensors[name], value.to("cpu", tensors[name].dtype)):
            raise RuntimeError(f"{path}: tensor {name} differs from the trained one after writing")
    warn_about_adapter(path, tensors)
    return tensors


def warn_about_adapter(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Warn when the adapter never trained (every lora_B zero) or carries full base weights."""
    lora_b = [value for name, value in tensors.items() if ".lora_B." in name]
    if lora_b and all(not value.any() for value in lora_b):
        logger.warning("%s: every lora_B is zero: this adapter never trained and changes nothing", path)
    extra = {name: value for name, value in tensors.items() if ".lora_A." not in name and ".lora_B." not in name}
    if extra:
        size = sum(value.numel() * value.element_size() for value in extra.values()) / 2**20
        logger.warning("%s: %d non-LoRA tensors (%.1f MiB; e.g. %s): full base weights (modules_to_save, "
                       "embeddings) leak into the adapter", path, len(extra), size, next(iter(extra)))




def save_subspace(subspace: Subspace | None, directory: Path) -> None:
    """Write the subspace sidecar and read it back (names, shapes and values must survive)."""
    if subspace is None:
        return
    path = directory / SUBSPACE_FILE
    subspace.save(path)
    numel = {name: basis.shape[1] for name, basis in subspace.basis_by_name.items()}
    loaded = Subspace.load(path, numel_by_name=numel)
    for name, basis in subspace.basis_by_name.items():
        if not torch.equal(loaded.basis_by_name[name], basis.detach().cpu()):
            raise RuntimeError(f"{path}: basis {name} differs after writing")




def export_adapter(source: Path, output: Path, *, include_subspace: bool = True, overwrite: bool = False) -> Path:
    """Re-export a training output or `checkpoint-N` as a clean standalone adapter directory.

    Copies the PEFT adapter (and the subspace sidecar and run config unless `include_subspace` is False),
    checks every tensor after copying, and writes a model card.

    Raises:
        InputError: no adapter_config.json / adapter file in `source`, corrupt files, or `output` exists.
    """
    if not (source / ADAPTER_CONFIG).is_file():
        raise InputError(f"--adapter {source}: no {ADAPTER_CONFIG}; give a training output or checkpoint directory")
    tensors = read_safetensors(source / ADAPTER_FILE, flag="--adapter")
    check_adapter_numbers(tensors, source / ADAPTER_FILE)  # NaN never equals itself: refused here, named
    output = output_path(output)
    check_output_dir(output, overwrite=overwrite, flag="--output")
    subspace = None
    if include_subspace and (source / SUBSPACE_FILE).is_file():
        numel = {name: value.numel() for name, value in tensors.items() if ".lora_" in name}
        try:
            subspace = Subspace.load(source / SUBSPACE_FILE, numel_by_name=numel)
        except ValueError as error:
            raise InputError(f"--adapter {source}: {error}") from error
    run_config = read_json(source / RUN_CONFIG) if (source / RUN_CONFIG).is_file() else {}
    with atomic_directory(output, overwrite=overwrite) as work:
        shutil.copy2(source / ADAPTER_CONFIG, work / ADAPTER_CONFIG)
        shutil.copy2(source / ADAPTER_FILE, work / ADAPTER_FILE)
        for name in TOKENIZER_FILES:  # the tokenizer and chat template travel with the adapter
            if (source / name).is_file():
                shutil.copy2(source / name, work / name)
        verify_adapter_file(work / ADAPTER_FILE, tensors)
        if subspace is not None:
            save_subspace(subspace, work)
        if run_config and include_subspace:
            write_json(work / RUN_CONFIG, run_config)
        metrics = read_jsonl(source / METRICS_FILE)
        write_model_card(work / CARD_FILE, run_config=run_config, subspace=subspace, metrics=metrics,
                         source=str(source))
    return output



