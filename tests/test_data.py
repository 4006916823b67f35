"""Data reading and validation, and reference tokenization identical to TRL's SFTTrainer."""

import json
import logging

import pytest
from datasets import Dataset

from lora_ogpsa.data.rows import (
    as_prompt_completion,
    fingerprint,
    read_rows,
    tokenize_prompt_completion,
    tokenize_rows,
    tokenize_sft_row,
)
from lora_ogpsa.testing.tiny import build_tokenizer
from lora_ogpsa.utils.errors import InputError

USER = {"role": "user", "content": "What is two plus two?"}
ASSISTANT = {"role": "assistant", "content": "Four."}


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_reads_messages_and_prompt_completion_rows(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"messages": [USER, ASSISTANT]}, "", {"messages": [
        {"role": "system", "content": "Be brief."}, USER, ASSISTANT]}])
    rows = read_rows(path, "sft")
    assert len(rows) == 2 and rows.source == str(path)
    assert rows.rows[0] == {"messages": [USER, ASSISTANT]}
    assert as_prompt_completion(rows.rows[0]) == {"prompt": [USER], "completion": [ASSISTANT]}
    assert as_prompt_completion(rows.rows[1])["prompt"][0]["role"] == "system"
    plain = read_rows(_write(tmp_path / "p.jsonl", [{"prompt": "2+2=", "completion": "4"}]), "sft")
    assert plain.rows == [{"prompt": "2+2=", "completion": "4"}]


def test_reads_json_arrays_and_datasets(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
    assert len(read_rows(path, "preference")) == 1
    dataset = Dataset.from_list([{"prompt": "a", "completion": "b"}])
    assert read_rows(dataset, "sft").rows == [{"prompt": "a", "completion": "b"}]
    dataset.save_to_disk(str(tmp_path / "saved"))
    assert len(read_rows(tmp_path / "saved", "sft")) == 1


def test_preference_rows_with_equal_chosen_and_rejected_are_skipped_and_counted(tmp_path, caplog):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"},
                                         {"prompt": "q", "chosen": "a", "rejected": "b"},
                                         {"prompt": "r", "chosen": "x", "rejected": "x"}])
    with caplog.at_level(logging.WARNING):
        rows = read_rows(path, "preference")
    assert len(rows) == 1 and rows.skipped == 2
    assert "skipped 2 preference rows" in caplog.text


@pytest.mark.parametrize(("lines", "kind", "message"), [
    ([], "sft", "the file is empty"),
    (["{not json"], "sft", r"d.jsonl:1: invalid JSON"),
    ([{"messages": [USER, ASSISTANT]}, "[1, 2]"], "sft", r"d.jsonl:2: each row must be a JSON object"),
    ([{"text": "hello"}], "sft", r"d.jsonl:1: missing field 'messages' \(or 'prompt' and 'completion'\)"),
    ([{"messages": "hello"}], "sft", r"field 'messages' must be a non-empty list of messages, got str"),
    ([{"messages": [USER]}], "sft", "needs an assistant message after at least one other message"),
    ([{"messages": [USER, {"role": "assistant", "content": 4}]}], "sft", r"'messages'\[1\].content must be a string"),
    ([{"messages": [{"role": "robot", "content": "x"}, ASSISTANT]}], "sft", r"'messages'\[0\].role must be one of"),
    ([{"prompt": "x", "completion": 3}], "sft", "field 'completion' must be a string or a list of messages, got int"),
    ([{"prompt": "x", "completion": [ASSISTANT]}], "sft",
     r"d.jsonl:1: fields 'prompt' and 'completion' must both be strings or both be lists of messages \('prompt' is a "
     r"string, 'completion' a list of messages\); write both in one format"),
    ([{"prompt": [USER], "chosen": "y", "rejected": [ASSISTANT]}], "preference",
     r"must all be strings or all be lists of messages \('prompt' is a list of messages, 'chosen' a string, "
     r"'rejected' a list of messages\)"),
    ([{"prompt": " ", "completion": "y"}], "sft", "field 'prompt' is empty"),
    ([{"prompt": "x", "chosen": "y"}], "preference", "missing field 'rejected'"),
    ([{"prompt": "x", "chosen": "y", "rejected": None}], "preference", "missing field 'rejected'"),
    ([{"prompt": "x", "chosen": "y", "rejected": "y"}], "preference", "no usable rows"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, lines, kind, message):
    path = _write(tmp_path / "d.jsonl", lines) if lines else (tmp_path / "d.jsonl")
    if not lines:
        path.write_text("")
    with pytest.raises(InputError, match=message) as error:
        read_rows(path, kind)
    assert "\n" not in str(error.value)


THREE_TURNS = {"messages": [{"role": "user", "content": "Hi, what is two plus two?"}, {"role": "assistant", "content": "Four."},
                             {"role": "user", "content": "And three plus three?"}, {"role": "assistant", "content": "Six."},
                             {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You are welcome."}]}


def test_mixed_formats_in_one_file_and_a_mixed_save_to_disk_dataset_are_read(tmp_path):
    """The README's example rows, saved as one file (issue 23, finding 2): each row in its own format."""
    lines = [{"messages": [USER, ASSISTANT]}, {"prompt": "2+2=", "completion": "4"},
             {"prompt": [USER], "completion": [ASSISTANT]}]
    rows = read_rows(_write(tmp_path / "mixed.jsonl", lines), "sft")
    assert rows.rows == lines
    saved = [lines[0], lines[2]]  # (Arrow holds no column of both strings and lists)
    columns = {"messages": None, "prompt": None, "completion": None}  # a dataset gives every row every column
    Dataset.from_list([{**columns, **row} for row in saved]).save_to_disk(str(tmp_path / "saved"))
    assert read_rows(tmp_path / "saved", "sft").rows == saved
    tokenizer = build_tokenizer()
    assert all(any(tokenize_sft_row(tokenizer, row, max_length=None).completion_mask) for row in rows.rows)


GENERATION_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['role'] == "
                       "'assistant' %}{% generation %}{{ message['content'] }}<|im_end|>\n{% endgeneration %}{% else %}"
                       "{{ message['content'] }}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
                       "<|im_start|>assistant\n{% endif %}")
"""The tiny model's template with TRL's `{% generation %}` markers around each assistant turn."""


@pytest.mark.parametrize("case", ["messages", "messages-assistant-only", "completion-all-tokens"])
def test_sft_loss_masks_match_trl_sft_trainer(tmp_path, case):
    """TRL's meanings of completion_only_loss / assistant_only_loss: same ids and same loss mask as SFTTrainer
    (issue 23, finding 3); a 3-turn row trains every assistant turn."""
    from trl import SFTConfig, SFTTrainer

    from lora_ogpsa.testing.tiny import save_tiny_model

    save_tiny_model(tmp_path / "model")
    tokenizer = build_tokenizer()
    if case == "messages-assistant-only":  # TRL needs `{% generation %}` markers; ours works without them
        tokenizer.chat_template = GENERATION_TEMPLATE
    rows = [THREE_TURNS] if case.startswith("messages") else [{"prompt": "Question? ", "completion": "Answer."}]
    flags = {"messages": {}, "messages-assistant-only": {"assistant_only_loss": True},
             "completion-all-tokens": {"completion_only_loss": False}}[case]
    args = SFTConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, bf16=False, **flags)
    trainer = SFTTrainer(model=str(tmp_path / "model"), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    theirs = next(iter(trainer.train_dataset))
    if "labels" not in theirs:  # TRL builds labels in the collator for some formats
        theirs = {key: value[0].tolist() for key, value in trainer.data_collator([theirs]).items()}
    if case == "messages-assistant-only":
        tokenizer.chat_template = build_tokenizer().chat_template
    mine = tokenize_sft_row(tokenizer, rows[0], max_length=None, **flags)
    assert theirs["input_ids"] == mine.input_ids
    assert [label != -100 for label in theirs["labels"]] == [bool(bit) for bit in mine.completion_mask]
    if case == "messages-assistant-only":  # every assistant turn, not only the last
        trained = tokenizer.decode([t for t, bit in zip(mine.input_ids, mine.completion_mask, strict=True) if bit])
        assert "Four." in trained and "Six." in trained and "welcome" in trained and "Thanks" not in trained


def test_missing_source_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match=r"--reference .*missing.jsonl: no such file"):
        read_rows(tmp_path / "missing.jsonl", "sft", flag="--reference")


@pytest.mark.parametrize("conversational", [True, False])
def test_tokenization_matches_trl_sft_trainer(tmp_path, conversational):
    """The reference loss must be the same NLL the SFT trainer optimises: same ids, same loss mask."""
    from trl import SFTConfig, SFTTrainer

    from lora_ogpsa.testing.tiny import save_tiny_model

    save_tiny_model(tmp_path / "model")
    tokenizer = build_tokenizer()
    if conversational:
        rows = [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
                 "completion": [{"role": "assistant", "content": "Answer " * (i + 1)}]} for i in range(4)]
    else:
        rows = [{"prompt": f"Question {i}? ", "completion": "Answer " * (i + 1)} for i in range(4)]
    max_length = 32 if conversational else 16  # truncates the longer rows
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_length=max_length, report_to="none", use_cpu=True,
                     bf16=False)
    trainer = SFTTrainer(model=str(tmp_path / "model"), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    prepared = list(trainer.train_dataset)
    ours = tokenize_rows(tokenizer, rows, max_length=max_length)
    assert len(prepared) == len(ours) == 4
    for theirs, mine in zip(prepared, ours, strict=True):
        assert theirs["input_ids"] == mine.input_ids
        assert [label != -100 for label in theirs["labels"]] == [bool(bit) for bit in mine.completion_mask]


def test_rows_whose_prompt_fills_max_length_are_dropped():
    tokenizer = build_tokenizer()
    long_row = {"prompt": [{"role": "user", "content": "word " * 50}], "completion": [ASSISTANT]}
    short_row = {"prompt": [USER], "completion": [ASSISTANT]}
    assert len(tokenize_rows(tokenizer, [long_row, short_row], max_length=40)) == 1
    with pytest.raises(InputError, match="raise --max-length"):
        tokenize_rows(tokenizer, [long_row], max_length=40)


def test_fingerprint_changes_with_content():
    tokenizer = build_tokenizer()
    one = tokenize_prompt_completion(tokenizer, {"prompt": "a", "completion": "b"}, max_length=None)
    two = tokenize_prompt_completion(tokenizer, {"prompt": "a", "completion": "c"}, max_length=None)
    assert fingerprint([one]) == fingerprint([one]) != fingerprint([two])


def test_a_folder_of_data_files_is_read_as_trl_reads_dataset_name(tmp_path):
    """Finding 4: `trl sft --dataset_name FOLDER` loads a local folder of data files; so does --data."""
    folder = tmp_path / "folder"
    folder.mkdir()
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(4)]
    for name, part in (("part-0.jsonl", rows[:2]), ("part-1.jsonl", rows[2:])):
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in part))
    read = read_rows(folder, "sft")
    assert sorted(row["prompt"] for row in read.rows) == [row["prompt"] for row in rows]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"neither a datasets\.save_to_disk directory nor a folder of data files"):
        read_rows(tmp_path / "empty", "sft")
