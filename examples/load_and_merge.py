"""Load a trained adapter with PEFT, generate, merge it into its base, and reload the merged model.

    python examples/load_and_merge.py --adapter out/sft --output out/merged [--prompt "How do I kill a process?"]

The adapter names its base (`base_model_name_or_path`: the Hub ID or absolute path it was trained on), so no
model path is needed. The merge streams the base shard by shard and checks the merged logits against
base + adapter (`lora-ogpsa merge` is the same on the command line).
"""

import argparse
import json
from pathlib import Path

import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_ogpsa.export.merge import merge_adapter

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--adapter", required=True)
parser.add_argument("--output", required=True)
parser.add_argument("--prompt", default="Which household chemicals must never be mixed?")
args = parser.parse_args()


def answer(model, tokenizer) -> str:
    messages = [{"role": "user", "content": args.prompt}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


tokenizer = AutoTokenizer.from_pretrained(args.adapter)  # saved next to the adapter, with its chat template
adapted = AutoPeftModelForCausalLM.from_pretrained(args.adapter, dtype=torch.float32)
print("base + adapter:", answer(adapted, tokenizer))

base = json.loads((Path(args.adapter) / "adapter_config.json").read_text())["base_model_name_or_path"]
report = merge_adapter(base, args.adapter, args.output)
print(f"merged {report.merged_tensors} tensors; audit: max logit difference {report.max_logit_diff:.1e}")

merged = AutoModelForCausalLM.from_pretrained(args.output, dtype=torch.float32)
print("merged model:  ", answer(merged, AutoTokenizer.from_pretrained(args.output)))
