"""Preference data for the trainer: loading records, tokenising them as TRL 1.16 does, truncating, collating.

Formats (TRL's), detected per record; other keys of a record are ignored:

- standard: `{"prompt": str, "chosen": str, "rejected": str}`; the completions follow the prompt directly (no
  separator is inserted).
- implicit prompt: `{"chosen": str, "rejected": str}`, two full texts that start with the same prompt.
- conversational: `prompt`, `chosen`, `rejected` are lists of `{"role", "content"}` messages (roles system, user,
  assistant; content a string); implicit conversational: `chosen` and `rejected` are two full conversations that
  start with the same messages.

A missing or `None` prompt means implicit. The implicit prompt is TRL's `extract_prompt` rule, on characters or
on messages: the longest common prefix of `chosen` and `rejected`; when it ends with a space, that space goes to
the completions; when one is a prefix of the other (or both are equal) the prompt stops one element short, so
that neither completion is empty. The prompt may end inside a word: tokenisation below finds the token boundary.
A record whose chosen and rejected share nothing is an error (there is no prompt to extract); identical chosen and
rejected are accepted. Every malformed record raises `ValueError` naming its origin (`file.jsonl:LINE`,
`file.json:LINE`, `dataset[i]`, `records[i]`) and the field; nothing is skipped silently (blank JSONL lines are
not records).

Tokenisation (`tokenize_pairs`) is TRL 1.16 `DPOTrainer._prepare_dataset`'s, so that without truncation the
`input_ids` and completion positions are TRL's, token for token:

- standard: the EOS string is appended to each completion that does not already end with it; then `prompt`,
  `prompt + chosen` and `prompt + rejected` are tokenised separately with the tokenizer's own special tokens
  (BOS for Llama-style tokenizers);
- conversational: no EOS is appended (the chat template ends turns); `prompt` is rendered with the generation
  prompt, `prompt + chosen` and `prompt + rejected` without it, through `tokenizer.apply_chat_template`;
- the prompt ends where the tokenised prompt stops being a prefix of both tokenised full sequences (tokens can
  merge across the boundary, or a template can render the prompt differently alone); what follows is the
  completion. A completion that comes out empty is an error.

Truncation policy (TRL 1.16 truncates in its collator, per row, and drops pairs whose prompt fills `max_length`
under `keep_start`; here the prompt stays shared by both rows and nothing is dropped):

1. `max_prompt_length` keeps the last `max_prompt_length` prompt tokens (the end of the prompt is next to the
   answer).
2. `max_length` bounds `prompt + completion` for each row:
   - `keep_start`: the prompt is kept whole and each completion keeps its first `max_length - len(prompt)`
     tokens (the cut completion loses its EOS). This is exactly TRL's `keep_start` whenever TRL keeps the pair.
     A pair whose prompt alone is `>= max_length` is an error (set `max_prompt_length < max_length`).
   - `keep_end`: completions are kept whole and the prompt keeps its last `max_length - longest completion`
     tokens, so both rows see the same context (TRL cuts each row on its own, so its two rows can see different
     prompts). A pair whose longer completion alone is `>= max_length` is an error.
   `TruncationReport` counts the prompts and the completions (chosen and rejected each) that were cut.

Collation (`collate_pairs`) follows TRL's collator: rows `[0, B)` are `prompt + chosen`, rows `[B, 2B)`
`prompt + rejected`, right-padded; `labels` are HF-style unshifted, the token id at completion positions and
`ignore_index` at prompt and padding positions.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant")
TRUNCATION_MODES = ("keep_start", "keep_end")

@dataclass(frozen=True)
class PreferenceRecord:
    """One preference pair after format detection, before tokenising (implicit prompts already extracted).

    `prompt`, `chosen`, `rejected` are all strings (standard) or all lists of messages (conversational).
    `origin` says where the record came from (`file.jsonl:17`, `dataset[17]`) for error messages.
    """

    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]
    origin: str

    @property
    def is_conversational(self) -> bool:
        return isinstance(self.chosen, list)


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair: the shared prompt and the two completions (EOS-terminated unless truncated)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    origin: str

    def __post_init__(self):
        for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
            value = getattr(self, name)
            if not isinstance(value, list):
                raise TypeError(f"TokenizedPair.{name} must be a list of ints, got {type(value).__name__}")
        for name in ("chosen_ids", "rejected_ids"):
            if not getattr(self, name):
                raise ValueError(f"{self.origin}: TokenizedPair.{name} is empty: a completion needs a token")


@dataclass
class TruncationReport:
    """What `tokenize_pairs` cut. `completions_truncated` counts chosen and rejected separately."""

    pairs: int
    prompts_truncated: int
    completions_truncated: int
    longest_sequence: int = 0  # tokens in the longest row (prompt + completion) after truncation
    max_length: int | None = None
    max_prompt_length: int | None = None
    truncation_mode: str = "keep_start"

    def __str__(self) -> str:
        return (
            f"{self.pairs} pairs, longest sequence {self.longest_sequence} tokens; "
            f"prompts truncated: {self.prompts_truncated} (max_prompt_length={self.max_prompt_length}); "
            f"completions truncated: {self.completions_truncated} of {2 * self.pairs} "
            f"(max_length={self.max_length}, {self.truncation_mode})"
        )


# ----------------------------------------------------------------------------------------------------------------
# Loading


def load_preference_records(source, *, split: str | None = None) -> list[PreferenceRecord]:
    """Reads every preference pair of `source` into a list of `PreferenceRecord`, in order.

    source: a path (str or `os.PathLike`) to a `.jsonl` file (one object per line) or a `.json` file (a list of
        objects, or an object mapping split names to such lists); a `datasets.Dataset` / `IterableDataset`; a
        `datasets.DatasetDict` or plain dict of splits; or a list of dicts.
    split: which split of a dict-shaped source; may be omitted when it has exactly one split.
    """
    rows = _rows_of(source, split)
    records = [_parse_record(raw, origin) for raw, origin in rows]
    if not records:
        raise ValueError(f"{_describe(source, split)}: no preference records (the source is empty)")
    return records


def _describe(source, split) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    name = type(source).__name__
    return f"{name}[{split!r}]" if split is not None else name


def _rows_of(source, split) -> list:
    """[(raw record, origin)] of `source`; raises before returning anything if the source itself is unusable."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(
                f"source: no such file: {str(source)!r} (expected a .jsonl or .json file; to use a Hub dataset, "
                "load it with datasets.load_dataset and pass the Dataset)"
            )
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            if split is not None:
                raise ValueError(f"split={split!r} given, but {path} is a JSONL file, which has no splits")
            return list(_jsonl_rows(path))
        if suffix == ".json":
            return list(_json_rows(path, split))
        raise ValueError(f"source: expected a .jsonl or .json file, got {str(path)!r}")
    if isinstance(source, Mapping):  # DatasetDict, IterableDatasetDict, or a plain dict of splits
        if any(key in source for key in ("prompt", "chosen", "rejected")):
            raise TypeError(
                "source is a dict with prompt/chosen/rejected keys (one record, or columns), not a dict of splits: "
                "pass a list of records or a datasets.Dataset"
            )
        name = "dataset" if type(source).__module__.startswith("datasets") else "records"
        chosen_split = _pick_split(list(source.keys()), split, f"source ({type(source).__name__})")
        return _sequence_rows(source[chosen_split], f"{name}[{chosen_split!r}]")
    if split is not None:
        raise ValueError(
            f"split={split!r} given, but source is a {type(source).__name__}, which has no splits "
            "(split applies to a DatasetDict, a dict of splits or a .json file holding one)"
        )
    if isinstance(source, (list, tuple)):
        return _sequence_rows(source, "records")
    if type(source).__module__.startswith("datasets"):  # Dataset, IterableDataset
        return _sequence_rows(source, "dataset")
    raise TypeError(
        "source must be a path to a .jsonl/.json file, a datasets.Dataset or DatasetDict, or a list of dicts; "
        f"got {type(source).__name__}"
    )


def _pick_split(available: list, split: str | None, what: str) -> str:
    if split is None:
        if len(available) == 1:
            return available[0]
        raise ValueError(f"{what} has splits {available}: pass split= to choose one")
    if split not in available:
        raise ValueError(f"split={split!r} not found in {what}; available splits: {available}")
    return split


def _sequence_rows(rows: Iterable, prefix: str) -> list:
    return [(row, f"{prefix}[{index}]") for index, row in enumerate(rows)]


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text ({error.reason})") from None


def _jsonl_rows(path: Path) -> Iterator:
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        origin = f"{path}:{number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{origin}: invalid JSON ({error.msg}, column {error.colno})") from None
        yield raw, origin


_DECODER = json.JSONDecoder()
_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _json_rows(path: Path, split: str | None) -> list:
    """Rows of a .json list (or of one split of a dict of lists), each with the line where it starts."""
    text = _read_text(path)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: invalid JSON ({error.msg}, column {error.colno})") from None
    position = _WHITESPACE.match(text, 0).end()
    if isinstance(document, list):
        if split is not None:
            raise ValueError(f"split={split!r} given, but {path} holds a list of records, which has no splits")
        return _json_array_rows(text, position, path)
    if isinstance(document, dict) and document and all(isinstance(value, list) for value in document.values()):
        chosen_split = _pick_split(list(document.keys()), split, str(path))
        return _json_array_rows(text, _json_member_position(text, position, chosen_split), path)
    raise ValueError(
        f"{path}:1: expected a JSON list of records or an object mapping split names to lists of records, "
        f"got {type(document).__name__}" + (" (a single record?)" if isinstance(document, dict) else "")
    )


def _json_member_position(text: str, position: int, key: str) -> int:
    """Offset of the value of `key` in the JSON object starting at `position` (the last one, as json.loads)."""
    found = None
    position += 1  # past "{"
    while True:
        position = _WHITESPACE.match(text, position).end()
        if text[position] == "}":
            return found
        name, position = _DECODER.raw_decode(text, position)
        position = _WHITESPACE.match(text, position).end() + 1  # past ":"
        position = _WHITESPACE.match(text, position).end()
        if name == key:
            found = position
        _, position = _DECODER.raw_decode(text, position)
        position = _WHITESPACE.match(text, position).end()
        if text[position] == ",":
            position += 1


def _json_array_rows(text: str, position: int, path: Path) -> list:
    rows = []
    line, counted_to = 1, 0
    position += 1  # past "["
    while True:
        position = _WHITESPACE.match(text, position).end()
        if text[position] == "]":
            return rows
        line += text.count("\n", counted_to, position)
        counted_to = position
        raw, position = _DECODER.raw_decode(text, position)
        rows.append((raw, f"{path}:{line}"))
        position = _WHITESPACE.match(text, position).end()
        if text[position] == ",":
            position += 1


def _type_name(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _parse_record(raw, origin: str) -> PreferenceRecord:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{origin}: expected an object with fields prompt/chosen/rejected, got {_type_name(raw)}")
    for name in ("chosen", "rejected"):
        if raw.get(name) is None:
            raise ValueError(f"{origin}: field {name!r} is {_absence(raw, name)}")
    chosen = _parse_side(raw["chosen"], "chosen", origin)
    rejected = _parse_side(raw["rejected"], "rejected", origin)
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if _is_empty(value):
            raise ValueError(f"{origin}: field {name!r} is empty: a completion needs text")
    kind = _kind(chosen)
    if _kind(rejected) != kind:
        raise ValueError(f"{origin}: field 'rejected' is {_kind(rejected)} but 'chosen' is {kind}")
    prompt = raw.get("prompt")
    if prompt is None:
        prompt, chosen, rejected = _split_implicit_prompt(chosen, rejected, f"{origin}: field 'prompt' is "
                                                          f"{_absence(raw, 'prompt')}")
        return PreferenceRecord(prompt, chosen, rejected, origin)
    prompt = _parse_side(prompt, "prompt", origin)
    if _kind(prompt) != kind:
        raise ValueError(f"{origin}: field 'prompt' is {_kind(prompt)} but 'chosen' and 'rejected' are {kind}")
    if isinstance(prompt, list) and not prompt:
        raise ValueError(f"{origin}: field 'prompt' is an empty list: a conversational prompt needs a message")
    return PreferenceRecord(prompt, chosen, rejected, origin)


def _absence(raw: Mapping, name: str) -> str:
    """How field `name` of a record is absent: "missing", or "null" (JSON null, None)."""
    return "null" if name in raw else "missing"


def _kind(value) -> str:
    return "a list of messages" if isinstance(value, list) else "a string"


def _is_empty(value) -> bool:
    if isinstance(value, str):
        return value == ""
    return all(message["content"] == "" for message in value)


def _parse_side(value, name: str, origin: str):
    """A string, or a validated copy of a list of messages (keys whose value is None are dropped)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, (list, tuple)):
        raise ValueError(
            f"{origin}: field {name!r}: expected a string or a list of messages, got {_type_name(value)}"
        )
    messages = []
    for index, message in enumerate(value):
        where = f"{origin}: field {name!r}, message {index}"
        if not isinstance(message, Mapping):
            raise ValueError(f"{where}: expected an object with 'role' and 'content', got {_type_name(message)}")
        for key in ("role", "content"):
            if message.get(key) is None:
                raise ValueError(f"{where}: {key!r} is missing")
        if message["role"] not in CHAT_ROLES:
            raise ValueError(f"{where}: unknown role {message['role']!r}; expected one of {list(CHAT_ROLES)}")
        if not isinstance(message["content"], str):
            raise ValueError(f"{where}: 'content' must be a string, got {_type_name(message['content'])}")
        messages.append({key: item for key, item in message.items() if item is not None})
    return messages


def _split_implicit_prompt(chosen, rejected, where: str):
    """(prompt, chosen completion, rejected completion) by TRL's `extract_prompt` rule (module docstring);
    `where` starts the error message ("<origin>: field 'prompt' is missing")."""
    shortest = min(len(chosen), len(rejected))
    cut = next((index for index in range(shortest) if chosen[index] != rejected[index]), None)
    if cut is None:  # one is a prefix of the other: keep one element in each completion
        cut = shortest - 1
    elif cut > 0 and isinstance(chosen, str) and chosen[cut - 1] == " ":
        cut -= 1
    if cut <= 0:
        unit = "messages" if isinstance(chosen, list) else "text"
        raise ValueError(
            f"{where} and 'chosen' and 'rejected' share no leading {unit}, so no "
            "prompt can be extracted: give the prompt explicitly"
        )
    return chosen[:cut], chosen[cut:], rejected[cut:]


# ----------------------------------------------------------------------------------------------------------------
# Tokenising and truncation


def tokenize_pairs(
    records,
    tokenizer,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_start",
) -> tuple[list[TokenizedPair], TruncationReport]:
    """Tokenises `records` (a sequence of `PreferenceRecord`) as TRL 1.16 does, then truncates (module docstring).

    Returns `(pairs, report)`: one `TokenizedPair` per record, in order, and a `TruncationReport`. Raises
    `ValueError` naming every pair that cannot be truncated to fit (none is dropped).
    """
    records = _check_tokenize_arguments(records, tokenizer, max_length, max_prompt_length, truncation_mode)
    untruncated = [_tokenize_record(record, tokenizer) for record in records]
    shifted = [pair.origin for pair, prompt_was_prefix in untruncated if not prompt_was_prefix]
    if shifted:
        logger.warning(
            "%d of %d pairs: the tokenized prompt is not a prefix of the tokenized prompt + completion (first: %s); "
            "their completions start where the two diverge, as in TRL",
            len(shifted),
            len(records),
            shifted[0],
        )
    report = TruncationReport(
        pairs=len(records),
        prompts_truncated=0,
        completions_truncated=0,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        truncation_mode=truncation_mode,
    )
    pairs, unfit = [], []
    for pair, _ in untruncated:
        fitted = _truncate(pair, max_length, max_prompt_length, truncation_mode, report)
        if fitted is None:
            unfit.append(pair.origin)
            continue
        pairs.append(fitted)
        report.longest_sequence = max(
            report.longest_sequence, len(fitted.prompt_ids) + max(len(fitted.chosen_ids), len(fitted.rejected_ids))
        )
    if unfit:
        if truncation_mode == "keep_start":
            reason = (
                f"the prompt alone has >= max_length={max_length} tokens"
                + (f" after max_prompt_length={max_prompt_length}" if max_prompt_length is not None else "")
                + ", leaving no completion token; set max_prompt_length below max_length"
            )
        else:
            reason = (
                f"a completion alone has >= max_length={max_length} tokens, leaving no prompt token; raise "
                "max_length or use truncation_mode='keep_start'"
            )
        shown = ", ".join(unfit[:5]) + (f" and {len(unfit) - 5} more" if len(unfit) > 5 else "")
        raise ValueError(
            f"{len(unfit)} of {len(records)} pairs cannot be truncated ({truncation_mode}): {reason}: {shown}"
        )
    return pairs, report


def _check_tokenize_arguments(records, tokenizer, max_length, max_prompt_length, truncation_mode) -> list:
    if isinstance(records, (str, bytes)) or not isinstance(records, Iterable):
        raise TypeError(f"records must be a sequence of PreferenceRecord, got {type(records).__name__}")
    records = list(records)
    if not records:
        raise ValueError("records is empty: nothing to tokenize")
    for index, record in enumerate(records):
        if not isinstance(record, PreferenceRecord):
            raise TypeError(
                f"records[{index}] must be a PreferenceRecord (from load_preference_records), "
                f"got {type(record).__name__}"
            )
    for name, value, minimum in (("max_length", max_length, 2), ("max_prompt_length", max_prompt_length, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
            raise ValueError(f"{name} must be None or an int >= {minimum}, got {value!r}")
    if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
        raise ValueError(
            f"max_prompt_length={max_prompt_length} must be < max_length={max_length} (a completion needs room)"
        )
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {list(TRUNCATION_MODES)}, got {truncation_mode!r}")
    if not callable(tokenizer):
        raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
    standard = next((record for record in records if not record.is_conversational), None)
    if standard is not None and not getattr(tokenizer, "eos_token", None):
        raise ValueError(
            f"tokenizer has no eos_token, which standard-format records need (first: {standard.origin})"
        )
    conversational = next((record for record in records if record.is_conversational), None)
    if conversational is not None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "tokenizer has no chat_template, which conversational records need "
            f"(first: {conversational.origin})"
        )
    return records


def _token_ids(tokenizer, content, *, add_generation_prompt: bool = False) -> list:
    if isinstance(content, str):
        return list(tokenizer(text=content)["input_ids"])
    encoded = tokenizer.apply_chat_template(
        content, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return list(encoded["input_ids"])


def _common_prefix_length(first: Sequence, second: Sequence) -> int:
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return length


def _tokenize_record(record: PreferenceRecord, tokenizer) -> tuple:
    """(TokenizedPair before truncation, whether the tokenized prompt was a prefix of both full sequences)."""
    prompt, chosen, rejected = record.prompt, record.chosen, record.rejected
    if not record.is_conversational:
        eos = tokenizer.eos_token
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
    prompt_ids = _token_ids(tokenizer, prompt, add_generation_prompt=True)
    full_chosen = _token_ids(tokenizer, prompt + chosen)
    full_rejected = _token_ids(tokenizer, prompt + rejected)
    prompt_length = min(
        _common_prefix_length(prompt_ids, full_chosen), _common_prefix_length(prompt_ids, full_rejected)
    )
    for name, full in (("chosen", full_chosen), ("rejected", full_rejected)):
        if len(full) <= prompt_length:
            raise ValueError(f"{record.origin}: field {name!r}: the tokenized completion is empty")
    pair = TokenizedPair(
        prompt_ids=prompt_ids[:prompt_length],
        chosen_ids=full_chosen[prompt_length:],
        rejected_ids=full_rejected[prompt_length:],
        origin=record.origin,
    )
    return pair, prompt_length == len(prompt_ids)


def _truncate(pair: TokenizedPair, max_length, max_prompt_length, truncation_mode, report) -> TokenizedPair | None:
    """`pair` cut by the policy (module docstring), counting cuts in `report`; None when it cannot fit."""
    prompt, chosen, rejected = pair.prompt_ids, pair.chosen_ids, pair.rejected_ids
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt = prompt[len(prompt) - max_prompt_length :]
        report.prompts_truncated += 1
    if max_length is not None:
        if truncation_mode == "keep_start":
            room = max_length - len(prompt)
            if room < 1:
                return None
            if len(chosen) > room:
                chosen = chosen[:room]
                report.completions_truncated += 1
            if len(rejected) > room:
                rejected = rejected[:room]
                report.completions_truncated += 1
        else:
            room = max_length - max(len(chosen), len(rejected))
            if room < 1:
                return None
            if len(prompt) > room:
                prompt = prompt[len(prompt) - room :]
                report.prompts_truncated += 1
    if prompt is pair.prompt_ids and chosen is pair.chosen_ids and rejected is pair.rejected_ids:
        return pair
    return TokenizedPair(prompt, chosen, rejected, pair.origin)


# ----------------------------------------------------------------------------------------------------------------
# Collation


def collate_pairs(
    pairs,
    *,
    pad_token_id: int,
    ignore_index: int = -100,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """A batch of `B` pairs as `[2B, T]` int64 tensors: rows `[0, B)` prompt + chosen, `[B, 2B)` prompt + rejected.

    Returns `input_ids` (right-padded with `pad_token_id`), `attention_mask` (1 on tokens, 0 on padding) and
    `labels`: HF-style unshifted, `labels[r, t] = input_ids[r, t]` at completion positions and `ignore_index` at
    prompt and padding positions (with `shift=True` the hidden state at `t` predicts `labels[r, t + 1]`).
    `T` is the longest row, rounded up to a multiple of `pad_to_multiple_of` when given.
    """
    if isinstance(pairs, TokenizedPair) or not isinstance(pairs, Sequence):
        raise TypeError(f"pairs must be a list of TokenizedPair, got {type(pairs).__name__}")
    if not pairs:
        raise ValueError("pairs is empty: a batch needs at least one pair")
    for index, pair in enumerate(pairs):
        if not isinstance(pair, TokenizedPair):
            raise TypeError(f"pairs[{index}] must be a TokenizedPair, got {type(pair).__name__}")
    for name, value in (("pad_token_id", pad_token_id), ("ignore_index", ignore_index)):
        if isinstance(value, bool) or not isinstance(value, int):
            hint = " (the tokenizer has no pad token: set tokenizer.pad_token)" if value is None else ""
            raise TypeError(f"{name} must be an int, got {value!r}{hint}")
    if pad_to_multiple_of is not None and (
        isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1
    ):
        raise ValueError(f"pad_to_multiple_of must be None or an int >= 1, got {pad_to_multiple_of!r}")
    if ignore_index >= 0:
        for pair in pairs:
            if ignore_index in pair.chosen_ids or ignore_index in pair.rejected_ids:
                raise ValueError(
                    f"ignore_index={ignore_index} is a token id of a completion ({pair.origin}): those tokens would "
                    "be excluded from the loss; use a negative ignore_index"
                )

    rows = [(pair.prompt_ids, pair.chosen_ids) for pair in pairs]
    rows += [(pair.prompt_ids, pair.rejected_ids) for pair in pairs]
    width = max(len(prompt) + len(completion) for prompt, completion in rows)
    if pad_to_multiple_of is not None:
        width = math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of
    input_ids, attention_mask, labels = [], [], []
    for prompt, completion in rows:
        padding = width - len(prompt) - len(completion)
        input_ids.append(prompt + completion + [pad_token_id] * padding)
        attention_mask.append([1] * (len(prompt) + len(completion)) + [0] * padding)
        labels.append([ignore_index] * len(prompt) + completion + [ignore_index] * padding)
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.int64),
        "attention_mask": torch.tensor(attention_mask, dtype=torch.int64),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


class PreferenceDataset(torch.utils.data.Dataset):
    """A map-style dataset over tokenized pairs; batch it with
    `DataLoader(dataset, collate_fn=functools.partial(collate_pairs, pad_token_id=...))`."""

    def __init__(self, pairs: Sequence):
        pairs = list(pairs)
        for index, pair in enumerate(pairs):
            if not isinstance(pair, TokenizedPair):
                raise TypeError(f"pairs[{index}] must be a TokenizedPair, got {type(pair).__name__}")
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> TokenizedPair:
        return self.pairs[index]
