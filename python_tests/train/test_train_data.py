"""The trainer's data layer (`dpo_kernels.train.data`), its default tokenizer and its embedded dataset.

Loading each format from every kind of source, the errors (file:line and field), TRL's implicit-prompt rule,
the chat template, collation and masking against a hand-worked batch, every truncation mode, equality with TRL
1.16's own tokenisation and collator, the tokenizer's save/load round trip, and the shipped files.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import re

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from dpo_kernels.train import default_dataset  # noqa: E402
from dpo_kernels.train.data import (  # noqa: E402
    PreferenceDataset,
    PreferenceRecord,
    TokenizedPair,
    TruncationReport,
    collate_pairs,
    load_preference_records,
    tokenize_pairs,
)
from dpo_kernels.train.default_dataset import default_dataset_path  # noqa: E402
from dpo_kernels.train.default_tokenizer import default_tokenizer  # noqa: E402

BOS, EOS, PAD = 1, 2, 0


@functools.lru_cache(maxsize=None)
def _shared_tokenizer():
    return default_tokenizer()


def ids(text: str) -> list:
    """Token ids of `text`, character by character, without BOS (the default tokenizer is character level)."""
    return _shared_tokenizer()(text, add_special_tokens=False)["input_ids"]


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


STANDARD = [
    {"prompt": "sort: c a b", "chosen": " a b c", "rejected": " c b a"},
    {"prompt": "Hi \u00fc \u65e5\u672c", "chosen": " there</s>", "rejected": "!"},  # EOS given; non-ASCII
    {"prompt": "", "chosen": "x", "rejected": "x"},  # empty prompt; identical completions are accepted
    {"prompt": "two\nlines\t", "chosen": "a\n", "rejected": "b", "score": 3},  # other keys are ignored
]
IMPLICIT = [
    {"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"},  # the space before the answer goes to completions
    {"chosen": "The sky is blue", "rejected": "The sky is black"},  # the prompt ends inside a word
    {"chosen": "abc", "rejected": "abcd"},  # a prefix of the other: one character kept in each completion
    {"chosen": "same", "rejected": "same"},
]
CONVERSATIONAL = [
    {"prompt": [user("hi")], "chosen": [assistant("hello")], "rejected": [assistant("go")]},
    {
        "prompt": [{"role": "system", "content": "be kind"}, user("2+2?")],
        "chosen": [assistant("4")],
        "rejected": [assistant("5")],
    },
]
IMPLICIT_CONVERSATIONAL = [
    {"chosen": [user("hi"), assistant("hello")], "rejected": [user("hi"), assistant("go")]},
    {
        "chosen": [user("a"), assistant("b"), user("c"), assistant("yes")],
        "rejected": [user("a"), assistant("b"), user("c"), assistant("no")],
    },
]


FORMATS = [STANDARD, IMPLICIT, CONVERSATIONAL, IMPLICIT_CONVERSATIONAL]
FORMAT_NAMES = ["standard", "implicit", "conversational", "implicit-conversational"]


# ---------------------------------------------------------------------------------------------------- loading


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json-list", "json-splits", "list", "dataset", "dataset-dict"])
@pytest.mark.parametrize("rows", FORMATS, ids=FORMAT_NAMES)
def test_every_format_loads_from_every_source(tmp_path, kind, rows):
    split = None
    if kind == "jsonl":
        source = _write_jsonl(tmp_path / "pairs.jsonl", rows)
        origins = [f"{source}:{line}" for line in range(1, len(rows) + 1)]
    elif kind == "json-list":
        source = tmp_path / "pairs.json"
        source.write_text(json.dumps(rows, indent=1), encoding="utf-8")
        text = source.read_text()
        # each record starts on the line of its opening brace (at indentation 1)
        starts = [number for number, line in enumerate(text.splitlines(), start=1) if line == " {"]
        origins = [f"{source}:{line}" for line in starts]
    elif kind == "json-splits":
        source, split = tmp_path / "pairs.json", "test"
        source.write_text(json.dumps({"train": [STANDARD[0]], "test": rows}), encoding="utf-8")
        origins = [f"{source}:1"] * len(rows)  # all on line 1
    elif kind == "list":
        source = copy.deepcopy(rows)
        origins = [f"records[{i}]" for i in range(len(rows))]
    else:
        datasets = pytest.importorskip("datasets")
        source = datasets.Dataset.from_list(copy.deepcopy(rows))
        origins = [f"dataset[{i}]" for i in range(len(rows))]
        if kind == "dataset-dict":
            source, split = datasets.DatasetDict({"train": source, "eval": source.select([0])}), "train"
            origins = [f"dataset['train'][{i}]" for i in range(len(rows))]
    records = load_preference_records(source, split=split)
    assert [record.origin for record in records] == origins
    assert records == [_expected_record(row, origin) for row, origin in zip(rows, origins)]


def _expected_record(row, origin):
    if "prompt" in row:
        return PreferenceRecord(row["prompt"], row["chosen"], row["rejected"], origin)
    return PreferenceRecord(*EXPECTED_IMPLICIT[json.dumps(row)], origin)


EXPECTED_IMPLICIT = {
    json.dumps(IMPLICIT[0]): ("Q: 2+2? A:", " 4", " 5"),
    json.dumps(IMPLICIT[1]): ("The sky is bl", "ue", "ack"),
    json.dumps(IMPLICIT[2]): ("ab", "c", "cd"),
    json.dumps(IMPLICIT[3]): ("sam", "e", "e"),
    json.dumps(IMPLICIT_CONVERSATIONAL[0]): ([user("hi")], [assistant("hello")], [assistant("go")]),
    json.dumps(IMPLICIT_CONVERSATIONAL[1]): (
        [user("a"), assistant("b"), user("c")],
        [assistant("yes")],
        [assistant("no")],
    ),
}


def test_implicit_prompt_rule_is_trls_extract_prompt():
    trl_data_utils = pytest.importorskip("trl.data_utils")
    for row in IMPLICIT + IMPLICIT_CONVERSATIONAL:
        (record,) = load_preference_records([row])
        expected = trl_data_utils.extract_prompt(copy.deepcopy(row))
        assert (record.prompt, record.chosen, record.rejected) == (
            expected["prompt"],
            expected["chosen"],
            expected["rejected"],
        )


def test_implicit_record_without_shared_prefix_is_an_error():
    with pytest.raises(ValueError, match=r"records\[0\]: field 'prompt' is missing and 'chosen' and 'rejected' share"):
        load_preference_records([{"chosen": "yes", "rejected": "no"}])
    with pytest.raises(ValueError, match=r"records\[1\].*share no leading messages"):
        load_preference_records([STANDARD[0], {"chosen": [user("a")], "rejected": [user("b")]}])


def test_null_fields_are_reported_as_null():
    with pytest.raises(ValueError, match=r"records\[0\]: field 'prompt' is null and 'chosen' and 'rejected' share"):
        load_preference_records([{"prompt": None, "chosen": "yes", "rejected": "no"}])
    with pytest.raises(ValueError, match=r"records\[0\]: field 'chosen' is null$"):
        load_preference_records([{"prompt": "p", "chosen": None, "rejected": "no"}])


def test_null_prompt_means_implicit_and_null_message_keys_are_dropped():
    datasets = pytest.importorskip("datasets")
    rows = [
        STANDARD[0],
        IMPLICIT[0],  # a Dataset gives this row prompt=None
    ]
    records = load_preference_records(datasets.Dataset.from_list(rows))
    assert records[1] == PreferenceRecord("Q: 2+2? A:", " 4", " 5", "dataset[1]")
    messages = [{"role": "user", "content": "hi", "name": None}]
    (record,) = load_preference_records([_conversation(messages)])
    assert record.prompt == [user("hi")]


def _conversation(prompt):
    """A conversational record with `prompt` and valid completions."""
    return {"prompt": prompt, "chosen": [assistant("c")], "rejected": [assistant("r")]}


# (a record, or a raw line of text, and what the error must say after "file:line: ")
BAD_LINES = [
    ({"prompt": "p", "rejected": "r"}, r"field 'chosen' is missing"),
    ({"prompt": "p", "chosen": "c"}, r"field 'rejected' is missing"),
    ({"prompt": "p", "chosen": 7, "rejected": "r"}, r"field 'chosen': expected a string or a list of messages, got in"),
    ({"prompt": 3, "chosen": "c", "rejected": "r"}, r"field 'prompt': expected a string or a list of messages, got in"),
    ({"prompt": "p", "chosen": "c", "rejected": ""}, r"field 'rejected' is empty"),
    ({"prompt": "p", "chosen": [], "rejected": "r"}, r"field 'chosen' is empty"),
    ({"prompt": "p", "chosen": "c", "rejected": [assistant("r")]},
     r"field 'rejected' is a list of messages but 'chosen' is a string"),
    (_conversation("p"), r"field 'prompt' is a string but 'chosen' and 'rejected' are a list of messages"),
    (_conversation([]), r"field 'prompt' is an empty list"),
    (_conversation([{"role": "robot", "content": "x"}]), r"field 'prompt', message 0: unknown role 'robot'"),
    (_conversation([{"role": "user"}]), r"field 'prompt', message 0: 'content' is missing"),
    (_conversation([user(["x"])]), r"field 'prompt', message 0: 'content' must be a string, got a list"),
    (_conversation(["hi"]), r"field 'prompt', message 0: expected an object with 'role' and 'content', got str"),
    (["p", "c", "r"], r"expected an object with fields prompt/chosen/rejected, got a list"),
    ('{"prompt": "p", "chosen": "c", "rejected": "r"', r"invalid JSON \(Expecting ',' delimiter, column 47\)"),
]


@pytest.mark.parametrize("bad, message", BAD_LINES, ids=[m[:30] for _, m in BAD_LINES])
def test_malformed_jsonl_record_names_file_line_and_field(tmp_path, bad, message):
    path = tmp_path / "pairs.jsonl"
    good = json.dumps(STANDARD[0])
    line = bad if isinstance(bad, str) else json.dumps(bad)
    path.write_text(f"{good}\n\n{good}\n{line}\n{good}\n", encoding="utf-8")  # the bad record is on line 4
    with pytest.raises(ValueError, match=re.escape(f"{path}:4: ") + message):
        load_preference_records(path)


def test_malformed_json_record_names_its_line(tmp_path):
    path = tmp_path / "pairs.json"
    rows = [STANDARD[0], {"prompt": "p", "chosen": "c", "rejected": None}]
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    start = [number for number, line in enumerate(path.read_text().splitlines(), start=1) if line == "  {"][1]
    assert start == 7
    with pytest.raises(ValueError, match=re.escape(f"{path}:{start}: field 'rejected' is null")):
        load_preference_records(path)
    path.write_text('[\n  {"prompt": "p",\n   "chosen": "c" "rejected": "r"}\n]', encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: invalid JSON")):
        load_preference_records(path)
    path.write_text(json.dumps(STANDARD[0]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"expected a JSON list of records .* \(a single record\?\)"):
        load_preference_records(path)


def test_dataset_record_error_names_its_index():
    datasets = pytest.importorskip("datasets")
    rows = [STANDARD[0], {"prompt": "p", "chosen": "c", "rejected": ""}]
    with pytest.raises(ValueError, match=r"^dataset\[1\]: field 'rejected' is empty"):
        load_preference_records(datasets.Dataset.from_list(rows))


def test_empty_and_unusable_sources(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{empty}: no preference records")):
        load_preference_records(empty)
    (tmp_path / "empty.json").write_text("[]", encoding="utf-8")
    with pytest.raises(ValueError, match="no preference records"):
        load_preference_records(tmp_path / "empty.json")
    with pytest.raises(ValueError, match="no preference records"):
        load_preference_records([])
    with pytest.raises(FileNotFoundError, match="source: no such file"):
        load_preference_records(tmp_path / "missing.jsonl")
    (tmp_path / "pairs.csv").write_text("prompt,chosen,rejected\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"source: expected a \.jsonl or \.json file"):
        load_preference_records(tmp_path / "pairs.csv")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl:2: not UTF-8 text"):
        load_preference_records(tmp_path / "latin1.jsonl")
    with pytest.raises(TypeError, match="source must be a path"):
        load_preference_records(42)
    with pytest.raises(TypeError, match="one record, or columns"):
        load_preference_records(STANDARD[0])


def test_split_errors(tmp_path):
    splits = {"train": [STANDARD[0]], "eval": [STANDARD[1]]}
    with pytest.raises(ValueError, match=r"has splits \['train', 'eval'\]: pass split="):
        load_preference_records(splits)
    with pytest.raises(ValueError, match=r"split='test' not found .* available splits: \['train', 'eval'\]"):
        load_preference_records(splits, split="test")
    assert load_preference_records({"only": [STANDARD[0]]})[0].origin == "records['only'][0]"
    with pytest.raises(ValueError, match=r"split='train' given, but source is a list"):
        load_preference_records([STANDARD[0]], split="train")
    path = _write_jsonl(tmp_path / "pairs.jsonl", [STANDARD[0]])
    with pytest.raises(ValueError, match="JSONL file, which has no splits"):
        load_preference_records(path, split="train")


# ------------------------------------------------------------------------------------------------- tokenising


def test_standard_tokenisation_by_hand():
    tokenizer = default_tokenizer()
    records = load_preference_records(STANDARD[:3])
    pairs, report = tokenize_pairs(records, tokenizer)
    assert pairs[0] == TokenizedPair(
        [BOS] + ids("sort: c a b"), ids(" a b c") + [EOS], ids(" c b a") + [EOS], "records[0]"
    )
    # the EOS already present is not doubled; non-ASCII characters are spelt in UTF-8 bytes
    assert pairs[1].prompt_ids == [BOS] + ids("Hi \u00fc \u65e5\u672c")
    assert len(pairs[1].prompt_ids) == 1 + 3 + 2 + 1 + 6
    assert pairs[1].chosen_ids == ids(" there") + [EOS]
    assert pairs[1].rejected_ids == ids("!") + [EOS]
    assert pairs[2] == TokenizedPair([BOS], ids("x") + [EOS], ids("x") + [EOS], "records[2]")
    assert isinstance(report, TruncationReport)
    assert (report.pairs, report.prompts_truncated, report.completions_truncated) == (3, 0, 0)
    assert report.longest_sequence == 13 + 7  # records[1]: its prompt and " there</s>"


def test_conversational_rendering_by_hand():
    tokenizer = default_tokenizer()
    user_token, assistant_token, system_token = (
        tokenizer.convert_tokens_to_ids(token) for token in ("<|user|>", "<|assistant|>", "<|system|>")
    )
    records = load_preference_records(CONVERSATIONAL + IMPLICIT_CONVERSATIONAL[1:])
    pairs, _ = tokenize_pairs(records, tokenizer)
    assert pairs[0] == TokenizedPair(
        [BOS, user_token] + ids("hi") + [EOS, assistant_token], ids("hello") + [EOS], ids("go") + [EOS], "records[0]"
    )
    def turn(role_token, text):
        return [role_token] + ids(text) + [EOS]

    assert pairs[1].prompt_ids == [BOS] + turn(system_token, "be kind") + turn(user_token, "2+2?") + [assistant_token]
    assert pairs[2].prompt_ids == (
        [BOS] + turn(user_token, "a") + turn(assistant_token, "b") + turn(user_token, "c") + [assistant_token]
    )
    assert (pairs[2].chosen_ids, pairs[2].rejected_ids) == (ids("yes") + [EOS], ids("no") + [EOS])
    text = tokenizer.apply_chat_template(CONVERSATIONAL[0]["prompt"], tokenize=False, add_generation_prompt=True)
    assert text == "<s><|user|>hi</s><|assistant|>"


def test_tokenize_argument_errors():
    tokenizer = default_tokenizer()
    records = load_preference_records(STANDARD[:1])
    with pytest.raises(ValueError, match="records is empty"):
        tokenize_pairs([], tokenizer)
    with pytest.raises(TypeError, match=r"records\[0\] must be a PreferenceRecord"):
        tokenize_pairs([STANDARD[0]], tokenizer)
    with pytest.raises(ValueError, match="max_length must be None or an int >= 2, got 1"):
        tokenize_pairs(records, tokenizer, max_length=1)
    with pytest.raises(ValueError, match="max_prompt_length must be None or an int >= 1, got 0"):
        tokenize_pairs(records, tokenizer, max_prompt_length=0)
    with pytest.raises(ValueError, match="max_prompt_length=8 must be < max_length=8"):
        tokenize_pairs(records, tokenizer, max_length=8, max_prompt_length=8)
    with pytest.raises(ValueError, match=r"truncation_mode must be one of \['keep_start', 'keep_end'\], got 'left'"):
        tokenize_pairs(records, tokenizer, truncation_mode="left")
    no_template = default_tokenizer()
    no_template.chat_template = None
    with pytest.raises(ValueError, match=r"no chat_template, which conversational records need \(first: records\[0"):
        tokenize_pairs(load_preference_records(CONVERSATIONAL), no_template)


# ----------------------------------------------------------------------------------------------- truncation


def _pair(prompt="abc", chosen="de", rejected="fghi", **limits):
    """prompt: 4 tokens with BOS; chosen: 3 with EOS; rejected: 5 with EOS."""
    record = PreferenceRecord(prompt, chosen, rejected, "records[0]")
    (pair,), report = tokenize_pairs([record], default_tokenizer(), **limits)
    return pair, report


def test_truncation_keep_start_cuts_completion_ends():
    pair, report = _pair(max_length=6)
    assert pair == TokenizedPair([BOS] + ids("abc"), ids("de"), ids("fg"), "records[0]")
    assert (report.prompts_truncated, report.completions_truncated, report.longest_sequence) == (0, 2, 6)
    pair, report = _pair(max_length=8)
    assert pair == TokenizedPair([BOS] + ids("abc"), ids("de") + [EOS], ids("fghi"), "records[0]")
    assert (report.prompts_truncated, report.completions_truncated) == (0, 1)
    pair, report = _pair(max_length=9)  # everything fits exactly
    assert (report.prompts_truncated, report.completions_truncated, report.longest_sequence) == (0, 0, 9)


def test_truncation_keep_end_cuts_the_prompt_start():
    pair, report = _pair(max_length=8, truncation_mode="keep_end")
    assert pair == TokenizedPair(ids("abc"), ids("de") + [EOS], ids("fghi") + [EOS], "records[0]")
    assert (report.prompts_truncated, report.completions_truncated) == (1, 0)
    pair, report = _pair(max_length=6, truncation_mode="keep_end")
    assert pair.prompt_ids == ids("c") and (report.prompts_truncated, report.completions_truncated) == (1, 0)


def test_max_prompt_length_keeps_the_prompt_end():
    pair, report = _pair(max_prompt_length=2)
    assert pair == TokenizedPair(ids("bc"), ids("de") + [EOS], ids("fghi") + [EOS], "records[0]")
    assert (report.prompts_truncated, report.completions_truncated) == (1, 0)
    pair, report = _pair(max_prompt_length=2, max_length=6)
    assert pair == TokenizedPair(ids("bc"), ids("de") + [EOS], ids("fghi"), "records[0]")
    assert (report.prompts_truncated, report.completions_truncated) == (1, 1)
    assert str(report) == (
        "1 pairs, longest sequence 6 tokens; prompts truncated: 1 (max_prompt_length=2); "
        "completions truncated: 1 of 2 (max_length=6, keep_start)"
    )


def test_pairs_that_cannot_fit_are_errors_not_dropped():
    records = [PreferenceRecord("abc", "d", "e", f"records[{i}]") for i in range(7)]
    with pytest.raises(ValueError, match=(
        r"7 of 7 pairs cannot be truncated \(keep_start\): the prompt alone has >= max_length=4 tokens, leaving no "
        r"completion token; set max_prompt_length below max_length: records\[0\], .*, records\[4\] and 2 more"
    )):
        tokenize_pairs(records, default_tokenizer(), max_length=4)
    with pytest.raises(ValueError, match=r"1 of 1 pairs .*\(keep_end\): a completion alone has >= max_length=5"):
        _pair(max_length=5, truncation_mode="keep_end")


def test_keep_start_truncation_equals_trls_collator():
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    tokenizer = default_tokenizer()
    long_answer = {"prompt": "long prompt", "chosen": "a long answer", "rejected": "no"}
    records = load_preference_records(STANDARD[:2] + [long_answer])
    for max_length in (14, 16, 19):  # prompts have 12-13 tokens, completions 3-14
        full, _ = tokenize_pairs(records, tokenizer)
        cut, _ = tokenize_pairs(records, tokenizer, max_length=max_length)
        collator = trl_dpo.DataCollatorForPreference(pad_token_id=PAD, max_length=max_length)
        expected = collator([dataclasses.asdict(pair) for pair in full])  # TRL ignores the extra "origin"
        _assert_batch_equals_trl(collate_pairs(cut, pad_token_id=PAD), expected)


# ------------------------------------------------------------------------------------------------ collation


HAND_PAIRS = [
    TokenizedPair([1, 5], [7, 8, 2], [9, 2], "a"),
    TokenizedPair([1], [6, 2], [4, 4, 4, 2], "b"),
]


def test_collation_and_masking_by_hand():
    batch = collate_pairs(HAND_PAIRS, pad_token_id=99)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(tensor.dtype == torch.int64 for tensor in batch.values())
    assert batch["input_ids"].tolist() == [
        [1, 5, 7, 8, 2],
        [1, 6, 2, 99, 99],
        [1, 5, 9, 2, 99],
        [1, 4, 4, 4, 2],
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ]
    assert batch["labels"].tolist() == [
        [-100, -100, 7, 8, 2],
        [-100, 6, 2, -100, -100],
        [-100, -100, 9, 2, -100],
        [-100, 4, 4, 4, 2],
    ]


def test_collation_pad_to_multiple_and_ignore_index():
    batch = collate_pairs(HAND_PAIRS[1:], pad_token_id=0, ignore_index=-1, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[1, 6, 2, 0, 0, 0, 0, 0], [1, 4, 4, 4, 2, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-1, 6, 2, -1, -1, -1, -1, -1], [-1, 4, 4, 4, 2, -1, -1, -1]]


def test_collate_argument_errors():
    with pytest.raises(ValueError, match="pairs is empty"):
        collate_pairs([], pad_token_id=0)
    with pytest.raises(TypeError, match=r"pairs\[1\] must be a TokenizedPair, got dict"):
        collate_pairs([HAND_PAIRS[0], {"prompt_ids": [1]}], pad_token_id=0)
    with pytest.raises(TypeError, match=r"pad_token_id must be an int, got None \(the tokenizer has no pad token"):
        collate_pairs(HAND_PAIRS, pad_token_id=None)
    with pytest.raises(ValueError, match="pad_to_multiple_of must be None or an int >= 1, got 0"):
        collate_pairs(HAND_PAIRS, pad_token_id=0, pad_to_multiple_of=0)
    with pytest.raises(ValueError, match=r"ignore_index=4 is a token id of a completion \(b\)"):
        collate_pairs(HAND_PAIRS, pad_token_id=0, ignore_index=4)
    with pytest.raises(ValueError, match=r"x: TokenizedPair.chosen_ids is empty"):
        TokenizedPair([1], [], [2], "x")


def test_preference_dataset_batches_through_a_dataloader():
    dataset = PreferenceDataset(HAND_PAIRS)
    collate = functools.partial(collate_pairs, pad_token_id=99)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate)
    (batch,) = list(loader)
    assert torch.equal(batch["labels"], collate_pairs(HAND_PAIRS, pad_token_id=99)["labels"])
    assert len(dataset) == 2 and dataset[1] is HAND_PAIRS[1]


# ---------------------------------------------------------------------------------------- equality with TRL


def _assert_batch_equals_trl(ours, trl_batch):
    assert torch.equal(ours["input_ids"], trl_batch["input_ids"])
    assert torch.equal(ours["attention_mask"], trl_batch["attention_mask"])
    assert torch.equal(ours["labels"] != -100, trl_batch["completion_mask"].bool())
    assert torch.equal(ours["labels"], torch.where(trl_batch["completion_mask"].bool(), trl_batch["input_ids"], -100))


@pytest.mark.parametrize("rows", FORMATS, ids=FORMAT_NAMES)
def test_tokenisation_and_collation_equal_trl(tmp_path, rows):
    """TRL's `DPOTrainer`, given the default tokenizer as processing_class, tokenises and collates as we do."""
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    import transformers
    from trl import DPOConfig, DPOTrainer

    tokenizer = default_tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config)
    fields = {field.name for field in dataclasses.fields(DPOConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, fp16=False, report_to=[], max_length=None,
                     disable_tqdm=True, save_strategy="no", **{checkpointing: False})
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                         train_dataset=datasets.Dataset.from_list(copy.deepcopy(rows)), processing_class=tokenizer)
    trl_rows = [trainer.train_dataset[i] for i in range(len(rows))]

    pairs, report = tokenize_pairs(load_preference_records(copy.deepcopy(rows)), default_tokenizer())
    for pair, trl_row in zip(pairs, trl_rows):
        assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == (
            trl_row["prompt_ids"], trl_row["chosen_ids"], trl_row["rejected_ids"]
        ), pair.origin
    trl_batch = trainer.data_collator(
        [{key: row[key] for key in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in trl_rows]
    )
    _assert_batch_equals_trl(collate_pairs(pairs, pad_token_id=tokenizer.pad_token_id), trl_batch)
    assert (report.prompts_truncated, report.completions_truncated) == (0, 0)


# ------------------------------------------------------------------------------------------------ tokenizer


def test_default_tokenizer_vocabulary_and_round_trip():
    tokenizer = default_tokenizer()
    assert len(tokenizer) == 360
    special_ids = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
    assert special_ids == (0, 1, 2, 3)
    texts = ["sort: q c m", "Hello, Tamo!\n\tx", "caf\u00e9 \u65e5\u672c \U0001f600", "<not special> </s"]
    for text in texts:
        encoded = tokenizer(text)["input_ids"]
        assert encoded[0] == BOS and tokenizer.unk_token_id not in encoded
        assert tokenizer.decode(encoded, skip_special_tokens=True) == text
    assert tokenizer("ab</s>")["input_ids"] == [BOS] + ids("ab") + [EOS]  # special tokens are recognised in text
    with pytest.raises(Exception, match="unknown chat role robot"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


def test_default_tokenizer_survives_save_and_auto_load(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = default_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tokenizer) and loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    records = load_preference_records(STANDARD + CONVERSATIONAL)
    assert tokenize_pairs(records, loaded)[0] == tokenize_pairs(records, tokenizer)[0]


# ----------------------------------------------------------------------------------------- shipped dataset


def test_shipped_dataset_sizes_format_and_disjoint_splits():
    train = load_preference_records(default_dataset_path("train"))
    held_out = load_preference_records(default_dataset_path("eval"))
    assert (len(train), len(held_out)) == (320, 64)
    assert all(isinstance(record.prompt, str) and record.prompt for record in train + held_out)
    train_prompts = {record.prompt for record in train}
    assert len(train_prompts) == 320 and len({record.prompt for record in held_out}) == 64
    assert not train_prompts & {record.prompt for record in held_out}
    # no held-out problem is a training problem in disguise (the same letters to sort in another order)
    def letters(records):
        return {frozenset(r.prompt.split()[1:]) for r in records if r.prompt.startswith("sort:")}
    assert len(letters(train)) == 80 and not letters(train) & letters(held_out)
    pairs, report = tokenize_pairs(train + held_out, default_tokenizer())
    assert report.longest_sequence == 32
    assert all(p.chosen_ids != p.rejected_ids for p in pairs)
    with pytest.raises(ValueError, match=r"split must be one of \['train', 'eval'\], got 'test'"):
        default_dataset_path("test")


def test_generator_reproduces_the_shipped_files(tmp_path):
    paths = default_dataset.write(tmp_path)
    for split, path in paths.items():
        assert path.read_bytes() == default_dataset_path(split).read_bytes(), split
    other = default_dataset.generate(seed=default_dataset.SEED + 1)
    assert other["train"] != default_dataset.generate()["train"]


def test_shipped_pairs_follow_their_rules():
    """The chosen answer follows each task's rule and the rejected one breaks it."""
    for record in load_preference_records(default_dataset_path("train")) + load_preference_records(
        default_dataset_path("eval")
    ):
        task, argument = record.prompt.split(": ", 1)
        if task == "sort":
            expected = " " + " ".join(sorted(argument.split()))
        elif task == "upper":
            expected = " " + argument.upper()
        elif task == "evens":
            expected = " " + " ".join(d for d in argument.split() if int(d) % 2 == 0)
        else:
            assert task == "greet"
            expected = f" Hello, {argument}!"
        assert record.chosen == expected and record.rejected != expected, record.origin
