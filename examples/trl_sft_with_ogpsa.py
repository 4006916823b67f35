"""TRL's SFTTrainer with a PEFT LoraConfig on a 4-bit base, plus OGPSA in three lines.

    python examples/trl_sft_with_ogpsa.py --model MODEL_DIR --data examples/data/sft.jsonl \
        --reference examples/data/reference.jsonl --output out/sft --max-steps 20 --save-steps 10

Every update the optimizer applies is projected off the reference subspace; `output/` and its checkpoints get
`adapter_model.safetensors` and `ogpsa_subspace.safetensors` (the basis in force).
"""

import argparse

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer

from lora_ogpsa import OGPSACallback, OGPSAConfig, build_reference_set

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
for flag in ("--model", "--data", "--reference", "--output"):
    parser.add_argument(flag, required=True)
parser.add_argument("--max-steps", type=int, default=100)
parser.add_argument("--save-steps", type=int, default=50)
args = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(args.model)
tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
model = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=quantization, dtype=torch.float32)

ogpsa = OGPSAConfig(max_directions=8, reference_examples=32)
reference = build_reference_set(args.reference, tokenizer, ogpsa, max_length=512)

trainer = SFTTrainer(
    model=model,
    args=SFTConfig(output_dir=args.output, max_steps=args.max_steps, save_steps=args.save_steps, learning_rate=1e-4,
                   per_device_train_batch_size=4, logging_steps=10, max_length=512, report_to="none",
                   use_cpu=not torch.cuda.is_available()),
    train_dataset=load_dataset("json", data_files=args.data, split="train"),
    processing_class=tokenizer,
    peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
    callbacks=[OGPSACallback(ogpsa, reference)],
)
trainer.train()
trainer.save_model(args.output)
