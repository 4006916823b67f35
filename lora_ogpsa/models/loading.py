"""Load the base model (4-bit NF4 through bitsandbytes, or full precision) and attach or load LoRA adapters.

The stack quirks handled here (docs/STACK.md):
- bitsandbytes repacks 4-bit weights in place on the first eval-mode forward on AVX512-BF16 CPUs, after which
  every LoRA gradient is silently wrong: `disable_cpu_repack_` turns that off right after loading.
- TRL casts trainable LoRA tensors to bf16 when the base is quantized: `keep_lora_float32_` undoes it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    set_seed,
)

from lora_ogpsa.utils import limits
from lora_ogpsa.utils.errors import InputError, first_line
from lora_ogpsa.utils.files import (
    ADAPTER_CONFIG,
    ADAPTER_FILE,
    file_sha256,
    read_json,
    read_safetensors,
    safetensors_header,
)

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"
LORA_TENSOR_MARKERS = (".lora_A.", ".lora_B.")
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"


def default_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_model_dir(name_or_path: str | Path, revision: str = "main") -> Path:
    """A local model directory: the path itself, or a Hub ID's snapshot in the local Hugging Face cache.

    Nothing is downloaded (this project runs offline): a Hub ID that is not cached is an InputError that says
    how to fetch it.
    """

    if not is_hub_id(name_or_path):
        return check_model_dir(name_or_path)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(str(name_or_path), revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError) as error:
        raise InputError(f"--model {name_or_path}: not in the local Hugging Face cache and nothing is downloaded "
                         f"here; fetch it once with `hf download {name_or_path}` (or give a local "
                         "directory)") from error
    return check_model_dir(path)


def check_model_dir(path: str | Path) -> Path:
    """A local Hugging Face model directory: `config.json` and safetensors weights whose headers read (every
    shard its index lists), or InputError naming the file. Reads headers only, so it is cheap to repeat."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"--model {path}: no such directory; give a local Hugging Face model directory")
    if not (path / "config.json").is_file():
        raise InputError(f"--model {path}: no config.json in it; give a directory written by save_pretrained")
    refuse_model_code(path)
    try:  # transformers validates every field (types, ranges) here, in milliseconds: before any work, not at load
        AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except (ValueError, TypeError, OSError, KeyError, StrictDataclassError) as error:
        # huggingface_hub's validation error puts the field on its first line and what is wrong on its last
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        detail = lines[-1] if isinstance(error, StrictDataclassError) else first_line(error)
        raise InputError(f"--model {path / 'config.json'}: {detail}; fix the value or re-save the model with "
                         "save_pretrained") from error
    for shard, _ in weight_files(path):
        safetensors_header(shard, flag="--model")
    return path


def refuse_model_code(path: Path, *, flag: str = "--model") -> None:
    """Refuse a model directory that carries its own Python code (`*.py` files, or an `auto_map` in
    `config.json` / `tokenizer_config.json`), before transformers reads it: lora-ogpsa never runs code from a
    model directory (`trust_remote_code=False` on every load, and nothing asks on stdin).

    Raises:
        InputError: naming the file that brings code.
    """
    code = sorted(item.name for item in path.glob("*.py"))
    mapped = [name for name in ("config.json", "tokenizer_config.json") if (path / name).is_file()
              and isinstance(found := read_json(path / name, flag=flag), dict) and found.get("auto_map")]
    if code or mapped:
        what = f"an auto_map in {mapped[0]}" if mapped else f"Python code ({', '.join(code[:3])})"
        raise InputError(f"{flag} {path}: {what} — model code, which lora-ogpsa never runs (trust_remote_code is "
                         "always false); use a model whose architecture transformers ships, saved without code")


def weight_files(model_dir: Path) -> list[tuple[Path, list[str]]]:
    """The model's safetensors files and the keys its index promises in each ([] for a single file).

    Raises:
        InputError: no safetensors weights (this project never loads pickles), a bad index, a missing shard.
    """
    index = model_dir / SAFE_INDEX
    if index.is_file():
        weight_map = read_json(index, flag="--model")
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"--model {index}: no `weight_map` in it; re-save the model with save_pretrained")
        keys_by_file: dict[str, list[str]] = defaultdict(list)
        for key, file_name in weight_map.items():
            keys_by_file[file_name].append(key)
        missing = next((name for name in sorted(keys_by_file) if not (model_dir / name).is_file()), None)
        if missing:
            raise InputError(f"--model {model_dir}: shard {missing} listed in {SAFE_INDEX} is missing; copy the "
                             "complete checkpoint")
        return [(model_dir / name, keys) for name, keys in sorted(keys_by_file.items())]
    if (model_dir / SAFE_WEIGHTS).is_file():
        return [(model_dir / SAFE_WEIGHTS, [])]
    raise InputError(f"--model {model_dir}: no {SAFE_WEIGHTS} or {SAFE_INDEX} in it; this project reads "
                     "safetensors weights only (never pickles) — re-save with save_pretrained(safe_serialization=True)")


def check_adapter_dir(path: str | Path, *, flag: str = "--adapter") -> Path:
    """A PEFT LoRA adapter directory whose files agree: `adapter_config.json` readable, the weights' header
    readable, every lora_A / lora_B pair of one rank (the config's `r` unless a `rank_pattern` varies it).

    Raises:
        InputError: naming the file and what to do.
    """
    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file():
        raise InputError(f"{flag} {path}: no {ADAPTER_CONFIG} in it; give a directory written by "
                         "`lora-ogpsa sft|dpo|align|export` or PEFT's save_pretrained")
    config = read_json(path / ADAPTER_CONFIG, flag=flag)
    if not isinstance(config, dict) or not isinstance(config.get("r"), int) or config["r"] < 1:
        raise InputError(f"{flag} {path / ADAPTER_CONFIG}: no positive integer `r`; not a LoRA adapter config")
    shapes = {name: shape for name, (shape, _) in safetensors_header(path / ADAPTER_FILE, flag=flag).items()}
    fixed_rank = not (config.get("rank_pattern") or config.get("target_parameters"))
    for name, shape in shapes.items():
        if LORA_TENSOR_MARKERS[0] not in name:
            continue
        partner = name.replace(*LORA_TENSOR_MARKERS)
        rank = shape[0] if shape else None  # lora_A: (r, in, ...), lora_B: (out, r, ...) — linear or conv
        if partner not in shapes or len(shapes[partner]) < 2 or shapes[partner][1] != rank:
            raise InputError(f"{flag} {path / ADAPTER_FILE}: {name} has no matching lora_B of the same rank; "
                             "the adapter file is incomplete or corrupt")
        if fixed_rank and rank != config["r"]:
            raise InputError(f"{flag} {path / ADAPTER_FILE}: {name} has rank {rank}, {ADAPTER_CONFIG} says "
                             f"r={config['r']}; the config does not belong to these weights")
    check_adapter_numbers(read_safetensors(path / ADAPTER_FILE, flag=flag), path / ADAPTER_FILE, flag=flag)
    return path


def check_adapter_numbers(tensor_by_name: dict[str, torch.Tensor], where: str | Path, *,
                          flag: str = "--adapter") -> None:
    """Every LoRA tensor of an adapter is floating point and every floating tensor finite: an adapter stored as
    integers, or with a NaN/Inf, is refused before it is evaluated, merged, exported or trained on.

    Raises:
        InputError: naming the file, the tensor and what it holds.
    """
    for name, tensor in tensor_by_name.items():
        if ".lora_" in name and not tensor.is_floating_point():
            raise InputError(f"{flag} {where}: tensor {name} is stored as {tensor.dtype}, not floating point; not a "
                             "trained LoRA adapter — re-save it from the trained model")
        if not tensor.is_floating_point() or not tensor.numel():
            continue
        low, high = tensor.aminmax()  # one NaN-propagating pass, no mask
        if not bool(torch.isfinite(low) & torch.isfinite(high)):
            raise InputError(f"{flag} {where}: tensor {name} has NaN/Inf values; the adapter is corrupt (did "
                             "training diverge?) — use an earlier checkpoint")


def load_tokenizer(path: str | Path, chat_template_path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token (the EOS token when the model defines none) and a chat template:
    its own, or the Jinja file `chat_template_path` (TRL's `--chat_template_path`, set here too because the
    rows and the reference are rendered before TRL's trainer exists).

    Raises:
        InputError: the tokenizer does not load, or it has no chat template and none is given.
    """
    directory = check_model_dir(path)  # its own one-line errors, not wrapped as a tokenizer failure
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise InputError(f"--model {path}: cannot load its tokenizer ({first_line(error)})") from error
    if chat_template_path is not None:
        tokenizer.chat_template = _read_chat_template(Path(chat_template_path))
    if not tokenizer.chat_template:
        raise InputError(f"--model {path}: its tokenizer has no chat template (no chat_template.jinja, no "
                         "`chat_template` in tokenizer_config.json); give one with --chat_template_path FILE.jinja "
                         "(sft) or save it as chat_template.jinja in the model directory")
    _check_template_renders(tokenizer, path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


_PROBE = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
          {"role": "user", "content": "How are you?"}]


def _check_template_renders(tokenizer: PreTrainedTokenizerBase, path: str | Path) -> None:
    """Render a short conversation under a time limit: a template that loops without end is refused here, in
    one line, instead of hanging the command. A template that raises on it is left to the row checks."""
    seconds = limits.TEMPLATE_SECONDS
    with limits.time_limit(seconds, f"--model {path}: its chat template did not render a {len(_PROBE)}-message "
                           f"conversation in {seconds:g} s (a loop without end?); fix the template or give another "
                           "with --chat_template_path"):
        try:
            tokenizer.apply_chat_template(_PROBE, tokenize=False, add_generation_prompt=True)
        except Exception:
            logger.debug("the chat template raised on the probe conversation", exc_info=True)


def _read_chat_template(path: Path) -> str:
    flag = f"--chat_template_path {path}"
    if path.is_dir() or path.suffix not in (".jinja", ".j2"):
        # TRL clones a tokenizer directory's template with its special tokens and resizes the embeddings: the
        # adapter would not carry those rows, so only a template file is taken
        raise InputError(f"{flag}: give a Jinja template file (.jinja or .j2); a tokenizer directory's template "
                         "adds tokens to the model, which a LoRA adapter does not carry")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{flag}: cannot read it ({first_line(error)})") from error
    if not text.strip():
        raise InputError(f"{flag}: the file is empty; give a Jinja chat template")
    return text


def load_base_model(
    path: str | Path, *, quantize: bool, device: torch.device | str | None = None
) -> PreTrainedModel:
    """Load a causal LM from a local directory.

    Args:
        path: a directory written by `save_pretrained` (config.json + safetensors weights).
        quantize: 4-bit NF4 through bitsandbytes (compute in bf16 on CUDA, float32 on CPU); else float32.
        device: where the model goes (default: `default_device()`).

    Raises:
        InputError: not a model directory, or transformers cannot load it.
    """
    path = check_model_dir(path)
    device = torch.device(device) if device is not None else default_device()
    kwargs: dict = {"dtype": torch.float32, "device_map": {"": device}}
    if quantize:
        kwargs["quantization_config"] = nf4_config(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=False, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"--model {path}: cannot load it as a causal LM ({first_line(error)})") from error
    if quantize:
        disable_cpu_repack_(model)
    return model


def nf4_config(device: torch.device):
    """The BitsAndBytesConfig used for every 4-bit load (training, merge audit): NF4, double quantization."""
    from transformers import BitsAndBytesConfig

    compute_dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    # FSDP2 shards only floating-point parameters (accelerate leaves uint8-stored 4-bit weights whole on every rank):
    # under an FSDP launch the packed bytes are stored as the compute dtype, so the base is sharded too.
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_quant_storage=compute_dtype if fsdp else torch.uint8)


def disable_cpu_repack_(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights on eval-mode CPU forwards; returns the layers changed."""
    import bitsandbytes as bnb

    layers = [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]
    for module in layers:
        module.support_avx512bf16_for_cpu = False
    return len(layers)


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether the (base of the) model is loaded in 4 or 8 bit."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def lora_config(*, r: int, alpha: float | None = None, dropout: float = 0.0,
                target_modules: str | list[str] = "all-linear", use_rslora: bool = False,
                use_dora: bool = False) -> LoraConfig:
    """A causal-LM LoRA config; alpha defaults to 2·r (scaling 2)."""
    if r < 1:
        raise InputError(f"--lora-r must be >= 1, got {r}")
    return LoraConfig(r=r, lora_alpha=alpha if alpha is not None else 2 * r, lora_dropout=dropout,
                      target_modules=target_modules, use_rslora=use_rslora, use_dora=use_dora,
                      task_type="CAUSAL_LM")


def attach_lora(model: PreTrainedModel, config: LoraConfig, *, seed: int, gradient_checkpointing: bool) -> PeftModel:
    """Wrap the base in a fresh trainable LoRA adapter (float32 tensors).

    The seed is set right before `get_peft_model`, exactly as TRL's trainers do, so the random lora_A init is
    the one a plain TRL + PEFT run with the same seed gets.
    """
    if is_quantized(model):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    set_seed(seed)
    peft_model = get_peft_model(model, config, adapter_name=ADAPTER_NAME)
    keep_lora_float32_(peft_model)
    return peft_model


def load_adapter(model: PreTrainedModel, adapter_dir: str | Path, *, trainable: bool,
                 gradient_checkpointing: bool = False) -> PeftModel:
    """Load a saved PEFT adapter onto the base (trainable to continue training it, e.g. SFT→DPO)."""
    adapter_dir = check_adapter_dir(adapter_dir)
    if trainable and is_quantized(model):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=ADAPTER_NAME,
                                               is_trainable=trainable)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise InputError(f"--adapter {adapter_dir}: cannot load it onto this base model ({first_line(error)}); "
                         "was it trained on another architecture?") from error
    keep_lora_float32_(peft_model)
    return peft_model


def lora_parameters(model: torch.nn.Module, adapter_name: str = ADAPTER_NAME) -> dict[str, torch.nn.Parameter]:
    """The trainable lora_A / lora_B weights of one adapter, keyed as in `adapter_model.safetensors`.

    PEFT's parameter `...q_proj.lora_A.default.weight` is saved as `...q_proj.lora_A.weight`.
    """
    marker = f".{adapter_name}."
    return {
        name.replace(marker, "."): parameter
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and marker in name and any(m in name for m in LORA_TENSOR_MARKERS)
    }


def keep_lora_float32_(model: torch.nn.Module) -> None:
    """Cast every trainable LoRA tensor to float32 (TRL casts them to bf16 on a quantized base)."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()


def is_hub_id(model: str | Path) -> bool:
    """`org/name` that is not an existing local path: a Hugging Face Hub ID."""
    text = str(model)
    return isinstance(model, str) and not Path(text).exists() and text.count("/") == 1 \
        and not text.startswith((".", "/", "~")) and all(text.split("/"))


def model_fingerprint(model_path: str | Path) -> str:
    """A sha256 over a model directory's weights, config and tokenizer files (names and contents).

    Raises:
        InputError: not a directory, or no weights file in it.
    """
    directory = Path(model_path)
    if not directory.is_dir():
        raise InputError(f"--model {directory}: no such directory; give a local Hugging Face model directory")
    files = sorted(path for path in directory.iterdir() if path.is_file() and _is_model_file(path.name))
    if not any(path.suffix in (".safetensors", ".bin") for path in files):
        raise InputError(f"--model {directory}: no *.safetensors or *.bin weights in it")
    key = tuple((str(path.resolve()), path.stat().st_ino, path.stat().st_size, path.stat().st_mtime_ns) for path in files)
    if key not in _FINGERPRINTS:  # a run asks more than once (its config, its resume check): hash once
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.name.encode() + b"\0" + file_sha256(path).encode())
        _FINGERPRINTS[key] = digest.hexdigest()[:16]
    return _FINGERPRINTS[key]


_FINGERPRINTS: dict[tuple, str] = {}


def _is_model_file(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".json", ".jinja", ".model", ".txt")) \
        and not name.startswith(".")
