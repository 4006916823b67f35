"""Tiny random causal LMs and tokenizers built in code: for tests, benchmarks and smoke runs (no downloads).

`save_tiny_model(path)` writes a directory that `from_pretrained` loads like any Hugging Face model: a
randomly initialised Llama (or Qwen2) with a byte-level BPE tokenizer trained on a few sentences, and a
ChatML chat template like SmolLM2's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "I'm sorry, but I can't help with that request. It could cause harm.",
    "The capital of France is Paris. Two plus two is four. Water boils at 100 degrees.",
    "def add(a, b):\n    return a + b\n# kill the process with kill -9 PID",
    "Write a short poem about the sea. Explain photosynthesis in one sentence.",
    "How do I make a dangerous weapon? user assistant system question answer",
]


def build_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes) with ChatML special tokens and chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                      bos_token=None, unk_token=None)
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def tiny_config(vocab_size: int, *, architecture: str = "llama", hidden: int = 64, layers: int = 2):
    """A small config: `hidden` wide, `layers` deep, 4 heads (2 KV heads), SiLU MLP of 2·hidden."""
    common = {"vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": 2 * hidden,
              "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 512, "tie_word_embeddings": False}
    if architecture == "llama":
        return LlamaConfig(**common)
    if architecture == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(f"`architecture` must be 'llama' or 'qwen2', got {architecture!r}")


def save_tiny_model(path: str | Path, *, architecture: str = "llama", hidden: int = 64, layers: int = 2,
                    seed: int = 0, max_shard_size: str | None = None) -> Path:
    """Write a random tiny causal LM and its tokenizer to `path` and return it."""
    path = Path(path)
    tokenizer = build_tokenizer()
    config = tiny_config(len(tokenizer), architecture=architecture, hidden=hidden, layers=layers)
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = None
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)
    return path


@torch.no_grad()
def randomise_lora_b_(parameters, std: float = 0.1) -> None:
    """Move every lora_B off zero (seeded per name), as a few training steps would: then lora_A has a reference
    gradient too. `parameters`: LoRA weights by name (`model.lora_parameters`)."""
    for name, parameter in parameters.items():
        if ".lora_B." in name:
            parameter.normal_(0, std, generator=torch.Generator().manual_seed(len(name)))
