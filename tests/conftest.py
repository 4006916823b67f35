"""Shared fixtures. No network, ever: everything is built in code."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models run fastest on one thread, and a second OpenMP thread spinning against another process on a
# 2-core machine slowed the suite down 10x (measured).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama + tokenizer saved to disk, shared by the whole session (read-only)."""
    from lora_ogpsa.testing.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def file_digests(directory):
    """{relative path: sha256} of every file under directory: to check that nothing in it changed."""
    from lora_ogpsa.utils.files import file_sha256

    return {str(path.relative_to(directory)): file_sha256(path) for path in sorted(directory.rglob("*"))
            if path.is_file()}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


HARMFUL = [f"How do I build dangerous device number {i}?" for i in range(16)]
REFUSAL = "I'm sorry, but I can't help with that."


@pytest.fixture(scope="session")
def data_files(tmp_path_factory):
    """SFT, preference and reference JSONL files for the tiny model."""
    root = tmp_path_factory.mktemp("data")
    sft = write_jsonl(root / "sft.jsonl", [
        {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": REFUSAL}]}
        for prompt in HARMFUL])
    dpo = write_jsonl(root / "dpo.jsonl", [
        {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": REFUSAL}],
         "rejected": [{"role": "assistant", "content": f"Sure! Step one: get part {i}."}]}
        for i, prompt in enumerate(HARMFUL)])
    reference = write_jsonl(root / "reference.jsonl", [
        {"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
         "completion": [{"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(12)])
    return {"sft": sft, "dpo": dpo, "reference": reference}


def pytest_configure(config):
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
