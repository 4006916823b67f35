"""`lora-ogpsa eval`: greedy responses to a prompt set, a summary JSON and one JSONL record per prompt.

The summary (`--output FILE.json`) holds the rates with 95 % bootstrap intervals over prompts, the decoding
settings, the chat template's sha256 and the seed, so that a number can be traced to how it was made; the
per-sample file (`FILE.samples.jsonl`, next to it) holds one `{"id", "prompt", "response", "refused"}` object
per prompt (`correct` too for rows with answers), with an id that is a hash of the prompt: stable across
runs, orderings and `--limit`, so two evaluations can be joined on it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from lora_ogpsa.eval.generation import check_answer, generate, prompt_text, rate, records
from lora_ogpsa.eval.prompts import Prompt, PromptSet, load_prompts
from lora_ogpsa.eval.stats import bootstrap_ci
from lora_ogpsa.models.loading import check_adapter_dir, load_adapter, load_base_model, load_tokenizer
from lora_ogpsa.models.shapes import check_adapter_fits
from lora_ogpsa.utils.errors import InputError
from lora_ogpsa.utils.files import json_text, jsonl_text, write_texts_together
from lora_ogpsa.utils.outputs import output_lock, output_path, probe_writable

logger = logging.getLogger(__name__)


def prompt_id(prompt: Prompt) -> str:
    """A stable id of a prompt: the first 12 hex digits of the sha256 of its canonical JSON."""
    return hashlib.sha256(json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:12]


def samples_path(output: Path) -> Path:
    """Where the per-sample records of `output` go: `eval.json` → `eval.samples.jsonl`."""
    return output.with_name(f"{output.stem}.samples.jsonl")


def run_eval(model_path: str | Path, prompts: PromptSet | str | Path, output: str | Path, *,
             adapter_dir: str | Path | None = None, quantize: bool = False, max_new_tokens: int = 64,
             batch_size: int = 32, limit: int | None = None, system_prompt: str | None = None, seed: int = 0,
             overwrite: bool = False, device: torch.device | str | None = None) -> dict[str, Any]:
    """Generate greedy responses to a prompt set; write the summary JSON and the per-sample JSONL.

    Args:
        model_path: a local model directory or a cached Hub ID.
        prompts: a prompt set, or a .txt / .jsonl file (see `load_prompts`).
        output: the summary JSON file (written atomically, like the samples file next to it).
        adapter_dir: a PEFT adapter to load onto the model.
        quantize: load the base in 4-bit NF4.
        max_new_tokens, batch_size: generation settings (greedy).
        limit: evaluate only the first `limit` prompts.
        system_prompt: a system message put before every prompt.
        seed: torch's seed before generating (greedy decoding does not sample; recorded for completeness).
        overwrite: replace existing output files (refused otherwise, before any work).
        device: where the model goes (default: `model.default_device()`).

    Returns:
        dict: what was written to the summary (`refusal_rate`, `refusal_rate_ci`, `utility_accuracy(_ci)`,
        `decoding`, `chat_template_sha256`, `seed`, `samples_file`, `responses`, ...).

    Raises:
        InputError: bad prompts, settings, output path, model or adapter.
    """
    output = output_path(output)
    _check_settings(output, max_new_tokens=max_new_tokens, batch_size=batch_size, limit=limit, overwrite=overwrite)
    _check_samples_apart(output, {"--model": model_path, "--adapter": adapter_dir,
                                  "--prompts": prompts.source if isinstance(prompts, PromptSet) else prompts})
    with output_lock(output), output_lock(samples_path(output)):  # both files it writes: no other eval writes them
        return _run_eval(model_path, prompts, output, adapter_dir=adapter_dir, quantize=quantize,
                         max_new_tokens=max_new_tokens, batch_size=batch_size, limit=limit,
                         system_prompt=system_prompt, seed=seed, device=device)


def _run_eval(model_path, prompts, output: Path, *, adapter_dir, quantize: bool, max_new_tokens: int,
              batch_size: int, limit: int | None, system_prompt: str | None, seed: int, device) -> dict[str, Any]:
    prompt_set = prompts if isinstance(prompts, PromptSet) else load_prompts(prompts)
    prompt_set = _prepared(prompt_set, limit, system_prompt)
    tokenizer = load_tokenizer(model_path)  # checks the model directory first
    if adapter_dir is not None:
        check_adapter_fits(Path(model_path), check_adapter_dir(adapter_dir))
    model = load_base_model(model_path, quantize=quantize, device=device)
    if adapter_dir is not None:
        model = load_adapter(model, adapter_dir, trainable=False)
    torch.manual_seed(seed)
    responses = generate(model, tokenizer, prompt_set.prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    result = eval_result(prompt_set, responses, model=str(model_path), adapter=adapter_dir,
                         max_new_tokens=max_new_tokens)
    result.update(decoding={"do_sample": False, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                            "system_prompt": system_prompt, "limit": limit},
                  chat_template_sha256=hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest(),
                  seed=seed, samples_file=samples_path(output).name,
                  provenance=provenance(model_path, adapter_dir, prompt_set.source))
    output.parent.mkdir(parents=True, exist_ok=True)
    write_texts_together({samples_path(output): jsonl_text(result["responses"]), output: json_text(result)})
    logger.info("wrote %s: %d responses, refusal rate %.3f", output, result["n"], result["refusal_rate"])
    return result


def provenance(model_path: str | Path, adapter_dir: str | Path | None, source: str) -> dict[str, Any]:
    """What an evaluation was made with: package versions, UTC time, content hashes of the model's weights and
    the adapter's, and the split of a built-in suite (`harmbench-test` → `test`; None for a file)."""
    import datetime
    import importlib.metadata

    from lora_ogpsa.models.loading import model_fingerprint, resolve_model_dir
    from lora_ogpsa.utils.files import ADAPTER_FILE, file_sha256

    versions = {}
    for package in ("lora-ogpsa", "torch", "transformers", "peft", "trl", "bitsandbytes", "safetensors", "accelerate"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    directory = resolve_model_dir(model_path)
    split = source.rpartition("-")[2] if source.endswith(("-dev", "-test")) and not Path(source).exists() else None
    return {"versions": versions, "utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "model_dir": str(Path(directory).resolve()), "model_sha256": model_fingerprint(directory),
            "adapter_sha256": file_sha256(Path(adapter_dir) / ADAPTER_FILE) if adapter_dir is not None else None,
            "split": split}


def _check_samples_apart(output: Path, inputs: dict[str, Any]) -> None:
    """The samples file written beside `output` is none of the inputs (`--prompts D/mine.samples.jsonl` with
    `--output D/mine.json` would replace the user's prompts with per-prompt records)."""
    samples = samples_path(output)
    for flag, source in inputs.items():
        if source is not None and Path(source).exists() and Path(source).resolve() == samples.resolve():
            raise InputError(f"--output {output}: its per-prompt records go to {samples}, which is the input {flag} "
                             f"{source}; choose another --output name (an output never replaces an input)")


def _check_settings(output: Path, *, max_new_tokens: int, batch_size: int, limit: int | None,
                    overwrite: bool) -> None:
    for flag, value in (("--max-new-tokens", max_new_tokens), ("--batch-size", batch_size), ("--limit", limit)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"{flag} must be an integer >= 1, got {value!r}")
    if output.is_dir():
        raise InputError(f"--output {output}: is a directory; give a file name such as eval.json")
    existing = [path for path in (output, samples_path(output)) if path.exists()]
    if existing and not overwrite:
        raise InputError(f"--output {existing[0]}: exists; pass --overwrite to replace it, or choose another name")
    probe_writable(output)


def _prepared(prompt_set: PromptSet, limit: int | None, system_prompt: str | None) -> PromptSet:
    prompts, answers = prompt_set.prompts[:limit], prompt_set.answers[:limit]
    if system_prompt:
        prompts = [[{"role": "system", "content": system_prompt},
                    *([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt)]
                   for prompt in prompts]
    return PromptSet(prompt_set.source, list(prompts), list(answers))


def eval_result(prompt_set: PromptSet, responses: list[str], *, model: str, adapter: str | Path | None,
                max_new_tokens: int) -> dict[str, Any]:
    """The `lora-ogpsa eval` summary for responses to a prompt set (rates with 95 % bootstrap intervals)."""
    rows = [{"id": prompt_id(record["prompt"]), **record} for record in records(prompt_set.prompts, responses)]
    checked = []
    for row, answers in zip(rows, prompt_set.answers, strict=True):
        if answers is not None:
            row["correct"] = check_answer(row["response"], answers, question=prompt_text(row["prompt"]))
            checked.append(row["correct"])
    refused = [row["refused"] for row in rows]
    result: dict[str, Any] = {"model": model, "adapter": str(adapter) if adapter is not None else None,
                              "prompts": prompt_set.source, "n": len(rows), "refusal_rate": rate(refused) or 0.0,
                              "refusal_rate_ci": bootstrap_ci(refused), "max_new_tokens": max_new_tokens}
    if checked:
        result.update(utility_accuracy=rate(checked), utility_accuracy_ci=bootstrap_ci(checked),
                      n_utility=len(checked))
    result["responses"] = rows
    return result
