"""Evaluation on a tiny random model: generation state handling, teacher-forced NLL, metrics, the utility
checker, prompt files and built-in suites (every bad-input branch), and the eval JSON round trip."""

import json

import pytest
import torch
from peft import get_peft_model

from lora_ogpsa.demo.splits import BUILTIN_SUITES, DemoSizes, split_lookalike
from lora_ogpsa.demo.utility_questions import UTILITY_SET
from lora_ogpsa.eval import generation as evaluate
from lora_ogpsa.eval.generation import (
    EvalSuites,
    check_answer,
    evaluate_suites,
    generate,
    numbers_in,
    response_nll,
)
from lora_ogpsa.eval.prompts import UtilityItem, load_prompts
from lora_ogpsa.eval.run import prompt_id, run_eval
from lora_ogpsa.models.loading import load_base_model, load_tokenizer, lora_config, model_fingerprint
from lora_ogpsa.testing.tiny import save_tiny_model
from lora_ogpsa.utils.errors import InputError
from lora_ogpsa.utils.files import file_sha256


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_base_model(tiny_dir, quantize=False, device="cpu"), load_tokenizer(tiny_dir)


# ---- generation ----

def test_generate_restores_modes_and_leaves_the_padding_side(tiny):
    model, tokenizer = tiny
    model.train()
    model.model.layers[0].eval()  # a submodule with its own flag must keep it
    responses = generate(model, tokenizer, ["Hello there, how are you?", "Hi", [{"role": "user", "content": "x"}]],
                         max_new_tokens=3, batch_size=2)
    assert len(responses) == 3 and all(isinstance(response, str) for response in responses)
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    assert tokenizer.padding_side == "right"
    model.eval()


def test_generate_is_deterministic_and_keeps_prompt_order(tiny):
    model, tokenizer = tiny
    prompts = ["a long prompt about the sea and the capital of France", "b", "a medium prompt"]
    batched = generate(model, tokenizer, prompts, max_new_tokens=4, batch_size=3)
    assert batched == generate(model, tokenizer, prompts, max_new_tokens=4, batch_size=3)
    reversed_order = generate(model, tokenizer, prompts[::-1], max_new_tokens=4, batch_size=3)
    assert reversed_order[::-1] == batched


def test_a_shared_prefix_computed_once_gives_the_responses_of_full_prompts(tiny, monkeypatch):
    """Prompts opening with the same system message: the prefix's cache is computed once and copied into every
    batch (padding between prefix and suffix), and the responses equal those of whole, left-padded prompts and
    of one prompt at a time."""
    model, tokenizer = tiny
    system = {"role": "system", "content": "You are a careful assistant who answers in one short sentence."}
    prompts = [[system, {"role": "user", "content": text}] for text in
               ("How do I kill a stuck process?", "Hi", "What is the capital of France, and why is it there?",
                "Name a colour.", "Write a haiku about the sea in spring, with rain")]
    built = []
    original = evaluate._PrefixCache.build.__func__
    monkeypatch.setattr(evaluate._PrefixCache, "build",
                        classmethod(lambda cls, *a: built.append(original(cls, *a)) or built[-1]))
    shared = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3, share_prefix=True)
    assert built and built[0] is not None and len(built[0].ids) >= evaluate._PrefixCache.MIN_TOKENS
    assert shared == generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3, share_prefix=False)
    assert shared == [generate(model, tokenizer, [prompt], max_new_tokens=6, share_prefix=False)[0]
                      for prompt in prompts]


def test_prompts_without_a_common_prefix_take_the_plain_path(tiny):
    model, _ = tiny
    rows = [[5, 6, 7, 8, 9, 10], [5, 6, 1, 2, 3]]  # 2 shared tokens: below MIN_TOKENS
    assert evaluate._PrefixCache.build(model, rows) is None
    assert evaluate._PrefixCache.build(model, [[5, 6, 7, 8, 9]]) is not None  # one prompt: all but its last token


# ---- NLL of given answers ----

def test_response_nll_matches_a_manual_teacher_forced_loss(tiny):
    model, tokenizer = tiny
    prompt, answer = "What is 2 + 2?", "It is four."
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               return_dict=True)["input_ids"]
    full_ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": answer}], return_dict=True)["input_ids"]
    ids = torch.tensor([full_ids])
    labels = ids.clone()
    labels[:, :len(prompt_ids)] = -100
    with torch.no_grad():
        expected = model(input_ids=ids, labels=labels).loss.item()
    assert response_nll(model, tokenizer, [prompt], [answer]) == pytest.approx(expected, rel=1e-5)


def test_response_nll_does_not_depend_on_batching(tiny):
    model, tokenizer = tiny
    prompts = ["Name a fruit.", "Explain photosynthesis in one short sentence please.", "Hi"]
    answers = ["Apple.", "Plants turn light, water and air into sugar.", "Hello! How can I help you today?"]
    one = response_nll(model, tokenizer, prompts, answers, batch_size=1)
    three = response_nll(model, tokenizer, prompts, answers, batch_size=3)
    assert three == pytest.approx(one, rel=1e-5)
    assert 0 < one < 20


def test_response_nll_with_a_shared_prefix_equals_whole_sequences(tiny, monkeypatch):
    """A system message every prompt starts with: its cache is computed once, and the NLL is that of whole
    sequences (the prefix stops before the first answer token)."""
    model, tokenizer = tiny
    system = {"role": "system", "content": "You are a careful assistant who answers in one short sentence."}
    prompts = [[system, {"role": "user", "content": text}] for text in ("Name a fruit.", "Hi", "Why is the sky blue?")]
    answers = ["Apple.", "Hello! How can I help?", "Air scatters blue light more than red."]
    built = []
    original = evaluate._PrefixCache.build.__func__
    monkeypatch.setattr(evaluate._PrefixCache, "build",
                        classmethod(lambda cls, *a, **k: built.append(original(cls, *a, **k)) or built[-1]))
    shared = response_nll(model, tokenizer, prompts, answers, batch_size=2, share_prefix=True)
    assert built[0] is not None and len(built[0].ids) >= evaluate._PrefixCache.MIN_TOKENS
    assert shared == pytest.approx(response_nll(model, tokenizer, prompts, answers, batch_size=2, share_prefix=False),
                                   rel=1e-5)
    same_prompt = response_nll(model, tokenizer, prompts[:1] * 2, ["Apple.", "A pear."], batch_size=2,
                               share_prefix=True)
    assert same_prompt == pytest.approx(response_nll(model, tokenizer, prompts[:1] * 2, ["Apple.", "A pear."],
                                                     share_prefix=False), rel=1e-5)


# ---- utility checker ----

@pytest.mark.parametrize(("response", "answers", "question", "correct"), [
    ("The capital of France is Paris.", ("Paris",), "", True),
    ("PARIS!", ("Paris",), "", True),
    ("Parisian cafes are lovely.", ("Paris",), "", False),  # whole words only
    ("It is Lyon.", ("Paris",), "", False),
    ("Plants absorb carbon dioxide.", ("carbon dioxide", "CO2"), "", True),
    ("6 * 7 = 42.", ("42",), "What is 6 times 7?", True),
    ("6 * 7 = 48.", ("42",), "What is 6 times 7?", False),
    ("A kilometre is 1,000 meters.", ("1000",), "", True),
    ("An inch is 2.54 cm.", ("2.54",), "", True),
    ("The answer is four.", ("4", "four"), "", True),
    ("100 minus 50 is 10.", ("50",), "What is 100 minus 50?", False),  # an echoed question number earns nothing
    ("3 + 4 = 7", ("7", "seven"), "What is 3 + 4?", True),
    ("I'm sorry, but I can't help with that.", ("Paris",), "", False),
    ("", ("Paris",), "", False),
    ("x" * 300 + " Paris", ("Paris",), "", False),  # only the opening counts
])
def test_check_answer(response, answers, question, correct):
    assert check_answer(response, answers, question=question) is correct


def test_numbers_in():
    assert numbers_in("1,000 and -3.5 and 42.") == [1000.0, -3.5, 42.0]


# ---- the four metrics ----

def test_evaluate_suites_computes_each_metric(tiny, monkeypatch):
    model, tokenizer = tiny
    canned = {"harm 1": "I'm sorry, but I can't help with that.", "harm 2": "Sure, here is how.",
              "harm 3": "I cannot provide that.", "kill a process?": "Run kill PID.",
              "nice": "I can't assist with that.", "capital?": "Paris.", "2+2?": "5"}
    monkeypatch.setattr(evaluate, "generate", lambda model, tokenizer, prompts, **kwargs: [canned[p] for p in prompts])
    suites = EvalSuites(harmful=["harm 1", "harm 2", "harm 3"], benign=["kill a process?", "nice"],
                        benign_answers=["Use kill.", "Thanks!"],
                        utility=[UtilityItem("capital?", ("Paris",)), UtilityItem("2+2?", ("4",))])
    metrics = evaluate_suites(model, tokenizer, suites, keep_responses=True)
    assert metrics["harmful_refusal_rate"] == pytest.approx(2 / 3)
    assert metrics["over_refusal_rate"] == 0.5
    assert metrics["utility_accuracy"] == 0.5
    assert metrics["benign_nll"] == pytest.approx(response_nll(model, tokenizer, suites.benign,
                                                               suites.benign_answers))
    assert (metrics["n_harmful"], metrics["n_benign"], metrics["n_utility"]) == (3, 2, 2)
    assert [record["correct"] for record in metrics["responses"]["utility"]] == [True, False]


def test_evaluate_suites_on_the_tiny_model_gives_rates_in_range(tiny):
    model, tokenizer = tiny
    suites = EvalSuites(harmful=["harmful request"], benign=["benign request"], benign_answers=["an answer"],
                        utility=[UtilityItem("What is 2 + 2?", ("4",))])
    metrics = evaluate_suites(model, tokenizer, suites, max_new_tokens=2)
    for key in ("harmful_refusal_rate", "over_refusal_rate", "utility_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["benign_nll"] > 0
    empty = evaluate_suites(model, tokenizer, EvalSuites([], [], []), max_new_tokens=2)
    assert empty["harmful_refusal_rate"] is None and empty["benign_nll"] is None


# ---- prompt files and built-in suites ----

def test_load_prompts_reads_text_and_jsonl(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("first prompt\n\n  second prompt  \n")
    assert load_prompts(text).prompts == ["first prompt", "second prompt"]
    rows = [{"prompt": "plain"}, {"prompt": [{"role": "system", "content": "be brief"},
                                             {"role": "user", "content": "hi"}]},
            {"prompt": "2+2?", "answers": ["4"]}]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    loaded = load_prompts(jsonl)
    assert loaded.prompts == [row["prompt"] for row in rows]
    assert loaded.answers == [None, None, ("4",)]


def test_builtin_suites_need_no_model():
    dev, test = (load_prompts(f"benign-{split}", BUILTIN_SUITES) for split in ("dev", "test"))
    held_out = {item.prompt for item in split_lookalike(DemoSizes(), 0)["eval"]}
    assert held_out <= set(dev.prompts) | set(test.prompts) and not set(dev.prompts) & set(test.prompts)
    assert len(test.prompts) >= 150 and len(load_prompts("harmbench-test", BUILTIN_SUITES).prompts) == 140
    utility = load_prompts("utility", BUILTIN_SUITES)
    assert utility.answers == [item.answers for item in UTILITY_SET]
    parts = [load_prompts(f"utility-{split}", BUILTIN_SUITES).prompts for split in ("dev", "test")]
    assert sorted(parts[0] + parts[1]) == sorted(utility.prompts) and len(parts[0]) == 40


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(("name", "text", "message"), [
    ("empty.txt", "", r"empty\.txt: no prompts in it"),
    ("blank.txt", "\n  \n", r"blank\.txt: no prompts in it"),
    ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": \n', r"bad\.jsonl:2: invalid JSON"),
    ("list.jsonl", '["a"]\n', r"list\.jsonl:1: each line must be a JSON object, got list"),
    ("missing.jsonl", '{"text": "hi"}\n', r"missing\.jsonl:1: missing field 'prompt'"),
    ("number.jsonl", '{"prompt": 3}\n', r"number\.jsonl:1: field 'prompt' must be a string or a non-empty list"),
    ("blankprompt.jsonl", '{"prompt": "  "}\n', r"blankprompt\.jsonl:1: field 'prompt' is empty"),
    ("emptylist.jsonl", '{"prompt": []}\n', r"emptylist\.jsonl:1: .*an empty list"),
    ("role.jsonl", '{"prompt": [{"role": "robot", "content": "x"}]}\n', r"role\.jsonl:1: field 'prompt'\[0\].role"),
    ("content.jsonl", '{"prompt": [{"role": "user", "content": 1}]}\n', r"content\.jsonl:1: field 'prompt'\[0\]"),
    ("answers.jsonl", '{"prompt": "2+2", "answers": "4"}\n', r"answers\.jsonl:1: field 'answers' must be"),
    ("prompts.csv", "a,b\n", r"unknown file type '\.csv'"),
])
def test_bad_prompt_files_are_input_errors(tmp_path, name, text, message):
    with pytest.raises(InputError, match=message):
        load_prompts(_write(tmp_path, name, text))


def test_unknown_suite_and_directory_are_input_errors(tmp_path):
    with pytest.raises(InputError, match=r"--prompts nosuch: no such file, and not a built-in suite"):
        load_prompts("nosuch", BUILTIN_SUITES)
    with pytest.raises(InputError, match=r"--prompts nosuch: no such file; give"):
        load_prompts("nosuch")
    with pytest.raises(InputError, match=r"is a directory"):
        load_prompts(tmp_path)


# ---- run_eval and its JSON ----

def test_run_eval_writes_json_that_round_trips(tiny_dir, tmp_path):
    prompts = _write(tmp_path, "prompts.jsonl", '{"prompt": "hello"}\n{"prompt": "2+2?", "answers": ["4"]}\n')
    output = tmp_path / "out" / "eval.json"
    result = run_eval(tiny_dir, prompts, output, max_new_tokens=3, batch_size=2, device="cpu")
    assert json.loads(output.read_text()) == result
    assert result["n"] == 2 and result["model"] == str(tiny_dir) and result["adapter"] is None
    assert [r["prompt"] for r in result["responses"]] == ["hello", "2+2?"]
    assert set(result["responses"][1]) == {"id", "prompt", "response", "refused", "correct"}
    assert 0.0 <= result["refusal_rate"] <= 1.0 and result["n_utility"] == 1
    low, high = result["refusal_rate_ci"]
    assert low <= result["refusal_rate"] <= high and len(result["utility_accuracy_ci"]) == 2
    assert result["decoding"] == {"do_sample": False, "max_new_tokens": 3, "batch_size": 2, "system_prompt": None,
                                  "limit": None}
    assert len(result["chat_template_sha256"]) == 64 and result["seed"] == 0
    samples = [json.loads(line) for line in (output.parent / "eval.samples.jsonl").read_text().splitlines()]
    assert samples == result["responses"] and samples[0]["id"] == prompt_id("hello")
    assert sorted(p.name for p in output.parent.iterdir()) == ["eval.json", "eval.samples.jsonl"]  # no temp file


def test_run_eval_limit_system_prompt_and_no_overwrite(tiny_dir, tmp_path):
    prompts = _write(tmp_path, "prompts.txt", "first\nsecond\nthird\n")
    output = tmp_path / "eval.json"
    result = run_eval(tiny_dir, prompts, output, max_new_tokens=2, limit=2, system_prompt="Be brief.",
                      device="cpu")
    assert result["n"] == 2 and result["responses"][0]["prompt"][0] == {"role": "system", "content": "Be brief."}
    before = output.read_bytes()
    with pytest.raises(InputError, match=r"eval.json: exists; pass --overwrite"):
        run_eval(tiny_dir, prompts, output, max_new_tokens=2)
    assert output.read_bytes() == before
    for flag, kwargs in (("--batch-size", {"batch_size": 0}), ("--max-new-tokens", {"max_new_tokens": -1}),
                         ("--limit", {"limit": 0})):
        with pytest.raises(InputError, match=flag):
            run_eval(tiny_dir, prompts, tmp_path / "other.json", **kwargs)


def test_run_eval_with_an_adapter(tiny_dir, tmp_path):
    adapter_dir = tmp_path / "adapter"
    get_peft_model(load_base_model(tiny_dir, quantize=False, device="cpu"), lora_config(r=2)).save_pretrained(
        adapter_dir)
    prompts = _write(tmp_path, "prompts.txt", "hello\n")
    result = run_eval(tiny_dir, prompts, tmp_path / "eval.json", adapter_dir=adapter_dir, max_new_tokens=2,
                      device="cpu")
    assert result["adapter"] == str(adapter_dir) and result["n"] == 1
    # provenance (issue 23, finding 7): versions, UTC time, content hashes of model and adapter, split
    on_disk = json.loads((tmp_path / "eval.json").read_text())["provenance"]
    assert on_disk["versions"]["torch"] and on_disk["versions"]["transformers"] and on_disk["utc"].endswith("+00:00")
    assert on_disk["adapter_sha256"] == file_sha256(adapter_dir / "adapter_model.safetensors")
    assert on_disk["model_sha256"] == model_fingerprint(tiny_dir) and on_disk["split"] is None
    wide = save_tiny_model(tmp_path / "wide", hidden=96)  # an adapter of another base: refused before loading
    with pytest.raises(InputError, match=r"--adapter .*adapter: its model.layers.0.\S+ is 64 x \d+, --model .*wide has "
                                         r"96 x \d+; the adapter was trained on another base"):
        run_eval(wide, prompts, tmp_path / "wide.json", adapter_dir=adapter_dir, max_new_tokens=2, device="cpu")
    assert not (tmp_path / "wide.json").exists()


def test_run_eval_bad_inputs_write_nothing(tiny_dir, tmp_path):
    prompts = _write(tmp_path, "prompts.txt", "hello\n")
    with pytest.raises(InputError, match=r"--output .*: is a directory"):
        run_eval(tiny_dir, prompts, tmp_path)
    with pytest.raises(InputError, match=r"--model .*nomodel: no such directory"):
        run_eval(tmp_path / "nomodel", prompts, tmp_path / "eval.json")
    with pytest.raises(InputError, match=r"--adapter .*: no adapter_config.json"):
        run_eval(tiny_dir, prompts, tmp_path / "eval.json", adapter_dir=tmp_path, device="cpu")
    assert not (tmp_path / "eval.json").exists()
