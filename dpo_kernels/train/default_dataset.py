"""The trainer's embedded preference dataset: four small instructions, each with a rule the answer must follow.

`python -m dpo_kernels.train.default_dataset` rewrites the shipped files `default_data/train.jsonl` (320 pairs)
and `default_data/eval.jsonl` (64 held-out pairs); the generator is seeded, so it writes the same bytes every time.
Records are TRL's standard format `{"prompt", "chosen", "rejected"}`: the chosen completion follows the
instruction, the rejected one breaks its rule. The tasks (written for this project):

- `sort: q c m` -> chosen ` c m q` (alphabetical order); rejected: the same letters in another order;
- `upper: bako` -> chosen ` BAKO`; rejected: the word with some or all of its letters left in lower case;
- `evens: 3 8 5 2` -> chosen ` 8 2` (the even digits, in order); rejected: ` 3 5` (the odd ones);
- `greet: Tamo` -> chosen ` Hello, Tamo!`; rejected: a rude or sloppy greeting of the same name.

Each task draws 96 different problems (the set of letters, the word, the digits, the name), the first 80 for
training and the last 16 held out, so no held-out prompt, nor a reordering of a held-out set of letters, appears
in training. Records interleave the tasks (sort, upper, evens, greet, sort, ...). The longest pair is 32 tokens
with the default (character-level) tokenizer, BOS and EOS included. A 2-layer Llama of hidden size 128 trained from
random initialisation with DPO (beta 0.1, 16 pairs a step, AdamW at 2e-3) on the training split passes a
held-out reward accuracy of 0.9 within a few dozen steps: the case, digit and greeting rules first, the
alphabetical order more slowly.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

SEED = 20261121
TRAIN_PAIRS_PER_TASK = 80
EVAL_PAIRS_PER_TASK = 16
SPLITS = ("train", "eval")

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_IMPOLITE_GREETINGS = ("Go away, {}.", "What, {}?", "Hello {}", "hello, {}!", "Bye, {}.")


def default_dataset_path(split: str = "train") -> Path:
    """Path of the shipped JSONL file of `split` ("train" or "eval")."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    return Path(__file__).with_name("default_data") / f"{split}.jsonl"


def _pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3)))


def _sort_problem(rng: random.Random):
    letters = rng.sample(string.ascii_lowercase, rng.randint(3, 5))
    return "".join(sorted(letters)), letters


def _sort_pair(rng: random.Random, letters: list) -> dict:
    answer = sorted(letters)
    wrong = answer
    while wrong == answer:
        wrong = rng.sample(letters, len(letters))
    return {"prompt": "sort: " + " ".join(letters), "chosen": " " + " ".join(answer), "rejected": " " + " ".join(wrong)}


def _upper_problem(rng: random.Random):
    word = _pseudo_word(rng)
    return word, word


def _upper_pair(rng: random.Random, word: str) -> dict:
    lower = set(rng.sample(range(len(word)), rng.randint(1, len(word))))
    wrong = "".join(c if i in lower else c.upper() for i, c in enumerate(word))
    return {"prompt": f"upper: {word}", "chosen": " " + word.upper(), "rejected": " " + wrong}


def _evens_problem(rng: random.Random):
    while True:
        digits = [rng.randrange(10) for _ in range(rng.randint(4, 6))]
        if any(d % 2 == 0 for d in digits) and any(d % 2 for d in digits):
            return tuple(digits), digits


def _evens_pair(rng: random.Random, digits: list) -> dict:
    even = [d for d in digits if d % 2 == 0]
    odd = [d for d in digits if d % 2]
    return {
        "prompt": "evens: " + " ".join(map(str, digits)),
        "chosen": " " + " ".join(map(str, even)),
        "rejected": " " + " ".join(map(str, odd)),
    }


def _greet_problem(rng: random.Random):
    name = _pseudo_word(rng).capitalize()
    return name, name


def _greet_pair(rng: random.Random, name: str) -> dict:
    wrong = rng.choice(_IMPOLITE_GREETINGS).format(name)
    return {"prompt": f"greet: {name}", "chosen": f" Hello, {name}!", "rejected": " " + wrong}


# (draw a problem -> (key, problem), make a pair of a problem); a key identifies a problem across splits
_TASKS = (
    (_sort_problem, _sort_pair),
    (_upper_problem, _upper_pair),
    (_evens_problem, _evens_pair),
    (_greet_problem, _greet_pair),
)


def _distinct_problems(rng: random.Random, count: int, draw) -> list:
    keys, problems = set(), []
    while len(problems) < count:
        key, problem = draw(rng)
        if key not in keys:
            keys.add(key)
            problems.append(problem)
    return problems


def generate(seed: int = SEED) -> dict:
    """{"train": [320 records], "eval": [64 records]}, tasks interleaved; deterministic in `seed`."""
    rng = random.Random(seed)
    by_task = {"train": [], "eval": []}
    for draw, make_pair in _TASKS:
        problems = _distinct_problems(rng, TRAIN_PAIRS_PER_TASK + EVAL_PAIRS_PER_TASK, draw)
        by_task["train"].append([make_pair(rng, problem) for problem in problems[:TRAIN_PAIRS_PER_TASK]])
        by_task["eval"].append([make_pair(rng, problem) for problem in problems[TRAIN_PAIRS_PER_TASK:]])
    return {split: [record for group in zip(*tasks) for record in group] for split, tasks in by_task.items()}


def write(directory: Path | None = None, seed: int = SEED) -> dict:
    """Writes `train.jsonl` and `eval.jsonl` into `directory` (default: the shipped location); returns their paths."""
    directory = Path(directory) if directory is not None else default_dataset_path().parent
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, records in generate(seed).items():
        path = directory / f"{split}.jsonl"
        path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
        paths[split] = path
    return paths


if __name__ == "__main__":
    for path in write().values():
        print(f"wrote {path}")
