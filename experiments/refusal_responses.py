"""Real model responses for the refusal detector's labelled set (`tests/data/refusal_labels.jsonl`).

Greedy, 64 new tokens (the evaluation's setting), from SmolLM2-135M-Instruct (the base, which rarely refuses) and
from aligned versions of it: a LoRA safety adapter after 15 and after 40 steps (which refuse and over-refuse), and
the 40-step adapter scaled to 0.3 and 0.5 of its weight change (W + λ·ΔW: weaker alignments, which refuse in the
base model's own words, partly refuse, or refuse then comply). Prompts: HarmBench and held-out Do-Not-Answer
prompts (harmful), Do-Not-Answer's questions to the chatbot about itself (base model only), benign prompts that
sound dangerous (`demo.dangerous_sounding.BANK`), and ordinary requests (`demo.prompts`). The adapter is trained
with `lora-ogpsa sft --project none` on Do-Not-Answer prompts → `refusal.pick_refusal`, plus a few ordinary prompts
→ the base model's own answers. Writes unlabelled `{"prompt", "response", "source"}` rows, `source` being
`<model>/<prompt set>` (a (prompt, response) pair seen before is skipped); the `refused` labels of the test file
were added afterwards by reading each response.

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python -m experiments.refusal_responses --output /tmp/refusal_responses.jsonl

On this project's 2-core CPU, shared: training (40 steps) 30 minutes, generation 5 to 40 minutes, depending on the
neighbours. With `--work DIR`, a rerun reuses the adapter trained there and each model's responses generated there
(`DIR/<model>.jsonl`), so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import logging
import random
import subprocess
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from lora_ogpsa.demo.assets import ensure_default_model, load_donotanswer, load_harmbench
from lora_ogpsa.demo.dangerous_sounding import BANK
from lora_ogpsa.demo.data import trim_to_sentence
from lora_ogpsa.demo.prompts import ORDINARY_PROMPTS_FLAT
from lora_ogpsa.eval.generation import generate
from lora_ogpsa.models.loading import load_adapter, load_base_model, load_tokenizer
from lora_ogpsa.refusal import pick_refusal
from lora_ogpsa.utils.files import read_jsonl, write_jsonl

logger = logging.getLogger(__name__)

MAX_NEW_TOKENS = 64
# prompts per set, for the base model and for each adapter (the adapters' sets are the first n of the base's)
BASE_COUNTS = {"harmbench": 30, "donotanswer": 30, "dangerous_sounding": 40, "ordinary": 20, "chatbox": 20}
ADAPTER_COUNTS = {"harmbench": 20, "donotanswer": 20, "dangerous_sounding": 30, "ordinary": 10, "chatbox": 0}
SFT_HARMFUL, SFT_BENIGN = 160, 24
STEPS, WEAK_STEPS = 40, 15
# aligned model name: (adapter directory under the trained one, λ in W + λ·ΔW)
ALIGNED = {f"sft{WEAK_STEPS}": (f"checkpoint-{WEAK_STEPS}", 1.0), f"sft{STEPS}": (".", 1.0),
           f"sft{STEPS}x0.3": (".", 0.3), f"sft{STEPS}x0.5": (".", 0.5)}


def prompt_sets(seed: int) -> tuple[dict[str, list[str]], list[dict], list[str]]:
    """Seeded, disjoint prompts: the evaluated sets by name, then the SFT harmful rows and benign prompts."""
    rng = random.Random(seed)
    harmful = load_donotanswer()
    ordinary = list(ORDINARY_PROMPTS_FLAT)
    rng.shuffle(harmful)
    rng.shuffle(ordinary)
    sets = {"harmbench": rng.sample(load_harmbench(), BASE_COUNTS["harmbench"]),
            "donotanswer": [row["prompt"] for row in harmful[:BASE_COUNTS["donotanswer"]]],
            "dangerous_sounding": [item.prompt for item in rng.sample(BANK, BASE_COUNTS["dangerous_sounding"])],
            "ordinary": ordinary[:BASE_COUNTS["ordinary"]]}
    sft_harmful = harmful[BASE_COUNTS["donotanswer"]:][:SFT_HARMFUL]
    unused = harmful[BASE_COUNTS["donotanswer"] + SFT_HARMFUL:]
    sets["chatbox"] = [row["prompt"] for row in unused if row["category"] == "human_chatbox"][:BASE_COUNTS["chatbox"]]
    sft_benign = ordinary[BASE_COUNTS["ordinary"]:][:SFT_BENIGN]
    return sets, sft_harmful, sft_benign


def respond(model, tokenizer, sets: dict[str, list[str]], counts: dict[str, int], name: str) -> list[dict]:
    """`{"prompt", "response", "source"}` rows for the first `counts[set]` prompts of every set."""
    rows = []
    for set_name, prompts in sets.items():
        chosen = prompts[:counts[set_name]]
        if not chosen:
            continue
        responses = generate(model, tokenizer, chosen, max_new_tokens=MAX_NEW_TOKENS, desc=f"{name}/{set_name}")
        rows += [{"prompt": prompt, "response": response, "source": f"{name}/{set_name}"}
                 for prompt, response in zip(chosen, responses, strict=True)]
    return rows


def write_sft_data(path: Path, harmful: list[dict], benign: list[str], benign_answers: list[str], seed: int) -> None:
    """Harmful prompts → a refusal template, benign prompts → the base model's answer, shuffled."""
    rng = random.Random(seed)
    pairs = [(row["prompt"], pick_refusal(rng, category=row["category"], intents=row["intents"])) for row in harmful]
    pairs += [(prompt, trim_to_sentence(answer)) for prompt, answer in zip(benign, benign_answers, strict=True)
              if answer]
    rng.shuffle(pairs)
    write_jsonl(path, [{"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
                       for prompt, answer in pairs])


def train_adapter(model_path: Path, data: Path, output: Path, seed: int) -> None:
    """Plain LoRA SFT through the command line (full precision, no projection)."""
    command = [sys.executable, "-m", "lora_ogpsa", "sft", "--model", str(model_path), "--data", str(data),
               "--ogpsa_project", "none", "--output", str(output), "--max-steps", str(STEPS),
               "--save-steps", str(WEAK_STEPS), "--learning-rate", "3e-4", "--batch-size", "8",
               "--max-length", "192", "--seed", str(seed), "--no-quantize"]
    subprocess.run(command, check=True)


def load_aligned(model_path: Path, adapter: Path, scale: float) -> torch.nn.Module:
    """The base with `scale` times an adapter's weight change merged in (ΔW = s·B·A is linear in B)."""
    model = load_adapter(load_base_model(model_path, quantize=False, device="cpu"), adapter, trainable=False)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.mul_(scale)
    return model.merge_and_unload()  # merged: generation runs 1.5-2x faster than through the LoRA layers


def model_rows(work: Path, name: str, load: Callable[[], torch.nn.Module], tokenizer, sets: dict[str, list[str]],
               counts: dict[str, int]) -> list[dict]:
    """One model's rows, generated once into `work/<name>.jsonl` (an interrupted run resumes by model)."""
    path = work / f"{name}.jsonl"
    if not path.is_file():
        write_jsonl(path, respond(load(), tokenizer, sets, counts, name))
    return read_jsonl(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="the JSONL file to write")
    parser.add_argument("--work", type=Path,
                        help="where the SFT data, the adapter and each model's responses go (default: a new temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    work = args.work or Path(tempfile.mkdtemp(prefix="refusal_responses_"))
    model_path = ensure_default_model()
    tokenizer = load_tokenizer(model_path)
    sets, sft_harmful, sft_benign = prompt_sets(args.seed)

    load_base = partial(load_base_model, model_path, quantize=False, device="cpu")
    trained = work / "adapter"
    if not (trained / "adapter_config.json").is_file():
        answers = generate(load_base(), tokenizer, sft_benign, max_new_tokens=MAX_NEW_TOKENS, desc="sft answers")
        write_sft_data(work / "sft.jsonl", sft_harmful, sft_benign, answers, args.seed)
        train_adapter(model_path, work / "sft.jsonl", trained, args.seed)
    rows = model_rows(work, "base", load_base, tokenizer, sets, BASE_COUNTS)
    for name, (directory, scale) in ALIGNED.items():
        load = partial(load_aligned, model_path, trained / directory, scale)
        rows += model_rows(work, name, load, tokenizer, sets, ADAPTER_COUNTS)

    first_by_pair: dict[tuple[str, str], dict] = {}
    for row in rows:
        first_by_pair.setdefault((row["prompt"], row["response"]), row)
    unique = list(first_by_pair.values())
    write_jsonl(args.output, unique)
    logger.info("wrote %d rows (%d duplicates skipped) to %s", len(unique), len(rows) - len(unique), args.output)


if __name__ == "__main__":
    main()
