"""TRL's DPOTrainer continuing an SFT adapter on a 4-bit base, plus OGPSA in three lines.

    python examples/trl_dpo_with_ogpsa.py --model MODEL_DIR --adapter out/sft --data examples/data/dpo.jsonl \
        --reference examples/data/reference.jsonl --output out/dpo --max-steps 20 --save-steps 10

The DPO reference model must be base + the frozen SFT adapter, not the bare base: given a PeftModel, TRL's
DPOTrainer copies its adapter into a frozen "ref" adapter, which is exactly that. Without --adapter a fresh
adapter is trained (reference model = the base, adapter disabled).
"""

import argparse

import torch
from datasets import load_dataset
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import DPOConfig, DPOTrainer

from lora_ogpsa import OGPSACallback, OGPSAConfig, build_reference_set

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
for flag in ("--model", "--data", "--reference", "--output"):
    parser.add_argument(flag, required=True)
parser.add_argument("--adapter", help="the SFT adapter to continue")
parser.add_argument("--max-steps", type=int, default=100)
parser.add_argument("--save-steps", type=int, default=50)
args = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(args.model)
tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quantization, dtype=torch.float32)
if args.adapter:
    model = PeftModel.from_pretrained(model, args.adapter, is_trainable=True)

ogpsa = OGPSAConfig(max_directions=8, reference_examples=32)
reference = build_reference_set(args.reference, tokenizer, ogpsa, max_length=512)

trainer = DPOTrainer(
    model=model,
    args=DPOConfig(output_dir=args.output, max_steps=args.max_steps, save_steps=args.save_steps, learning_rate=5e-5,
                   per_device_train_batch_size=4, logging_steps=10, max_length=512, beta=0.1, report_to="none",
                   use_cpu=not torch.cuda.is_available()),
    train_dataset=load_dataset("json", data_files=args.data, split="train"),
    processing_class=tokenizer,
    peft_config=None if args.adapter else LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                     task_type="CAUSAL_LM"),
    callbacks=[OGPSACallback(ogpsa, reference)],
)
trainer.train()
trainer.save_model(args.output)
