"""Prompts, reference answers and rewards for GCPO training and evaluation.

This module supplies the data side of the method: the prompts q, the reward
r_i in {0, 1} for each sampled response (1 when its final answer is
mathematically equivalent to the reference), and the meaning clusters that
the semantic-entropy baseline counts (responses whose final answers are
equivalent share a cluster). Answers are compared with math-verify.

Usage:
    items = load_items("arithmetic", split="train")         # built-in, seeded
    items = load_items("gsm8k", data="gsm8k/train.jsonl")   # local JSONL
    messages = build_messages(items[0], "arithmetic")       # chat messages
    reward, parsed = grade(completion, items[0].answer)     # (1.0 or 0.0, bool)
    cluster_ids = cluster_by_answer(completions)             # one id per completion

Simplifications and departures:
1. The reward is binary final-answer correctness. There is no format reward and
   no partial credit, so a response without a parsable answer earns 0.
2. The built-in arithmetic task replaces the benchmarks as the default, because
   a 135M policy trained on 2 CPU cores scores close to 0 on GSM8K, and a group
   whose rewards are all 0 carries no learning signal. Its five difficulty
   levels give easy prompts that the default policy often solves and hard ones
   that it rarely solves.
3. Meaning clusters come from answer equivalence, not from a bidirectional
   entailment model: on math, two responses mean the same when their final
   answers are equal. Equivalence is checked against the first member of each
   cluster, so a chain a~b, b~c with a!~c is split greedily in order.
4. A local JSONL file is used as given: `split` does not apply to it, and `n`
   keeps the first n lines.
"""

import json
import random
import threading
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

TASKS = ("arithmetic", "gsm8k", "math500")


@dataclass(frozen=True)
class Item:
    question: str  # the problem text shown to the model
    answer: str  # reference final answer, e.g. "42" or "\\frac{1}{2}"
    level: int = 0  # difficulty level 1..5 for the arithmetic task (0 = unknown)


# ---------------------------------------------------------------------------
# Built-in arithmetic task
# ---------------------------------------------------------------------------

LEVELS = (1, 2, 3, 4, 5)
DEFAULT_ARITHMETIC_SIZE = {"train": 2000, "test": 200}
# Every question belongs to exactly one split, decided by a stable hash of its
# text, so train and test never share a question for any seed or size.
TEST_SHARE = 5  # one question in TEST_SHARE goes to the test split


def _expression(level: int, rng: random.Random) -> str:
    """Draw one arithmetic expression of the given difficulty level (Python syntax)."""
    digit = lambda: rng.randint(2, 9)  # noqa: E731
    two_digit = lambda: rng.randint(10, 99)  # noqa: E731
    if level == 1:
        return f"{rng.randint(1, 20)} + {rng.randint(1, 20)}"
    if level == 2:
        a, b = two_digit(), two_digit()
        return f"{a} + {b}" if rng.random() < 0.5 else f"{max(a, b)} - {min(a, b)}"
    if level == 3:
        if rng.random() < 0.5:
            return f"{digit()} * {digit()}"
        return f"{digit()} + {digit()} + {digit()}"
    if level == 4:
        return f"{two_digit()} * {digit()}"
    if rng.random() < 0.5:
        return f"{two_digit()} * {two_digit()}"
    return f"({two_digit()} + {two_digit()}) * {digit()}"


def _split_of(question: str) -> str:
    # crc32, unlike hash(), does not change between Python processes.
    return "test" if zlib.crc32(question.encode()) % TEST_SHARE == 0 else "train"


def make_arithmetic(n: int, seed: int, split: str = "train") -> list[Item]:
    """Generate n arithmetic items, n // 5 (or one more) per difficulty level.

    The same (n, seed, split) always gives the same items. Each split draws from its
    own random stream and keeps only the questions that hash to it, so no question
    appears in both splits. Within the test split questions are unique, so accuracy
    is not weighted by repeats. The train split may repeat a question, because level 1
    has only 81 distinct questions and training revisits prompts anyway.
    """
    if split not in ("train", "test"):
        raise ValueError(f"invalid split {split!r} for the arithmetic task; use 'train' or 'test'")
    if n < 1:
        raise ValueError(f"invalid number of items n={n}; pass n >= 1")
    rng = random.Random(f"arithmetic-{split}-{seed}")  # str seeds are hashed with SHA-512, so stable
    items, seen = [], set()
    for i in range(n):
        level = LEVELS[i % len(LEVELS)]
        for _attempt in range(10_000):
            expr = _expression(level, rng)
            question = f"What is {expr}?"
            if _split_of(question) == split and not (split == "test" and question in seen):
                break
        else:
            raise ValueError(
                f"the test split has too few distinct level-{level} questions for n={n}; pass a smaller n"
            )
        seen.add(question)
        # eval is safe here: expr is built above from integers and + - * ( ) only.
        items.append(Item(question=question, answer=str(eval(expr)), level=level))
    rng.shuffle(items)  # mix levels, so that any prefix or batch spans all difficulties
    return items


# ---------------------------------------------------------------------------
# Loading items
# ---------------------------------------------------------------------------

# Hub name, config and split for each benchmark; MATH-500 has only a test split.
HUB_DATASETS = {
    "gsm8k": ("openai/gsm8k", "main", ("train", "test"), "question", "answer"),
    "math500": ("HuggingFaceH4/MATH-500", None, ("test",), "problem", "answer"),
}


def _reference_answer(raw) -> str:
    """Return the final answer of a reference, understanding GSM8K's "... #### 1,234" form."""
    text = str(raw)
    if "####" in text:
        text = text.rsplit("####", 1)[1].replace(",", "")
    return text.strip()


def _read_jsonl(path: Path, question_field: str, answer_field: str) -> list[Item]:
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} not found; pass --data PATH to an existing JSONL file")
    items = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}, line {line_number}: invalid JSON ({error.msg}); "
                    "each non-blank line must be one JSON object"
                ) from error
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path}, line {line_number}: expected a JSON object, got {type(record).__name__}"
                )
            missing = [name for name in (question_field, answer_field) if name not in record]
            if missing:
                raise ValueError(
                    f"{path}, line {line_number}: missing field(s) {missing}; the fields found are "
                    f"{sorted(record)}. Set --question-field / --answer-field to the names this file uses"
                )
            items.append(Item(str(record[question_field]), _reference_answer(record[answer_field])))
    if not items:
        raise ValueError(f"data file {str(path)!r} is empty; it needs one JSON object per line")
    return items


def _load_hub(task: str, split: str) -> list[Item]:
    name, config, splits, question_field, answer_field = HUB_DATASETS[task]
    if split not in splits:
        raise ValueError(f"{name} has no {split!r} split; use one of {list(splits)}")
    import datasets  # imported here because only the hub tasks need it

    try:
        rows = datasets.load_dataset(name, config, split=split)
    except OSError as error:  # ConnectionError, offline mode and missing datasets are all OSErrors
        raise RuntimeError(
            f"could not load {name!r} (split {split!r}) from the Hugging Face hub: {error}. "
            "The hub may be unreachable because there is no network or because HF_HUB_OFFLINE / "
            "HF_DATASETS_OFFLINE is set. Pass --data PATH to a local JSONL copy instead"
        ) from error
    return [Item(str(row[question_field]), _reference_answer(row[answer_field])) for row in rows]


def load_items(
    task: str = "arithmetic",
    data: str | None = None,
    split: str = "train",
    n: int | None = None,
    seed: int = 0,
    question_field: str = "question",
    answer_field: str = "answer",
) -> list[Item]:
    """Load the items of a task: generated, from a local JSONL file, or from the hub.

    `data` overrides the source for any task. The task then only picks the prompt
    template. `n` keeps the first n items (None keeps all, or the arithmetic default).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks are {', '.join(TASKS)}")
    if n is not None and n < 1:
        raise ValueError(f"invalid number of items n={n}; pass n >= 1 or leave it unset")
    if data is not None:
        items = _read_jsonl(Path(data), question_field, answer_field)
    elif task == "arithmetic":
        return make_arithmetic(n or DEFAULT_ARITHMETIC_SIZE.get(split, 200), seed, split)
    else:
        items = _load_hub(task, split)
    return items[:n] if n is not None else items


# ---------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------

# Prompt templates, kept short because the default policy has 135M parameters and a
# long instruction eats the context that a CPU run can afford to generate.
#   arithmetic: user = "{question} Put the final answer in \boxed{}."
#   gsm8k, math500: user = "{question}\nSolve step by step, then put the final answer in \boxed{}."
# No system message is added, so the chat template's own default (if any) applies.
ANSWER_INSTRUCTION = "Put the final answer in \\boxed{}."
REASONING_INSTRUCTION = "Solve step by step, then put the final answer in \\boxed{}."


def build_messages(item: Item, task: str) -> list[dict]:
    """Build the chat messages that prompt the model for one item."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks are {', '.join(TASKS)}")
    if task == "arithmetic":
        content = f"{item.question} {ANSWER_INSTRUCTION}"
    else:
        content = f"{item.question}\n{REASONING_INSTRUCTION}"
    return [{"role": "user", "content": content}]


# ---------------------------------------------------------------------------
# Answer extraction and grading (math-verify)
# ---------------------------------------------------------------------------

# \boxed{} is matched first (priority 0); otherwise LaTeX after "final answer is"
# and finally the last plain number or expression in the text.
EXTRACTION = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
TIMEOUT_SECONDS = 5


def _timeout() -> int | None:
    """Return the math-verify timeout, or None off the main thread.

    math-verify (0.9) enforces its timeouts with signal.alarm, which works only in
    the main thread, and raises ValueError elsewhere. Off the main thread we turn
    the timeout off, so a pathological expression there could hang the caller.
    """
    return TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None


def extract_answer(text: str) -> list | None:
    """Parse the final answer of a completion; None when no answer can be parsed.

    The list holds math-verify's candidates (sympy objects, plus the raw string when
    sympy conversion fails). It is what `verify` and `answers_equivalent` take.
    """
    parsed = parse(text, extraction_config=EXTRACTION, parsing_timeout=_timeout())
    return parsed or None


@lru_cache(maxsize=4096)
def _parse_reference(reference: str) -> list | None:
    # A bare reference such as "72" or "\frac{1}{2}" has no LaTeX delimiters, which
    # the LaTeX extractor needs, so it is wrapped in $...$ first.
    return extract_answer(f"${reference}$") or extract_answer(reference)


def answers_equivalent(a: list | None, b: list | None) -> bool:
    """Return whether two parsed answers (from extract_answer) are equivalent.

    math-verify's verify is not symmetric (it treats the first argument as the
    reference), so both directions are tried. None is equivalent to nothing.
    """
    if not a or not b:
        return False
    timeout = _timeout()
    return verify(a, b, timeout_seconds=timeout) or verify(b, a, timeout_seconds=timeout)


def grade(completion: str, reference: str) -> tuple[float, bool]:
    """Score a completion against a reference answer.

    Returns (reward, parsed): reward is 1.0 when the completion's final answer is
    equivalent to the reference and 0.0 otherwise, and parsed says whether any final
    answer could be extracted. Does not raise on malformed model output, because
    math-verify catches its own parsing and comparison errors.
    """
    answer = extract_answer(completion)
    if answer is None:
        return 0.0, False
    gold = _parse_reference(reference)
    if gold is None:
        return 0.0, True
    correct = verify(gold, answer, timeout_seconds=_timeout())
    return (1.0 if correct else 0.0), True


def cluster_by_answer(completions: list[str], unparsed: str = "singleton") -> list[int]:
    """Assign each completion a meaning-cluster id (0..k-1 in order of first appearance).

    Completions whose final answers are equivalent share a cluster. A completion with
    no parsable answer is, with unparsed="singleton" (the default), a cluster of its
    own: nothing shows that two unparsable responses mean the same, and treating them
    as distinct makes semantic entropy higher (more uncertain), not lower. With
    unparsed="shared" all of them form one extra cluster, treating "no answer" as one
    more meaning.
    """
    if unparsed not in ("singleton", "shared"):
        raise ValueError(f"invalid unparsed={unparsed!r}; use 'singleton' or 'shared'")
    ids: list[int] = []
    representatives: list[list | None] = []  # first answer of each cluster; None for unparsable ones
    shared_id = None
    for completion in completions:
        answer = extract_answer(completion)
        if answer is None:
            if unparsed == "shared" and shared_id is not None:
                ids.append(shared_id)
                continue
            representatives.append(None)
            ids.append(len(representatives) - 1)
            if unparsed == "shared":
                shared_id = ids[-1]
            continue
        match = next((k for k, rep in enumerate(representatives) if answers_equivalent(rep, answer)), None)
        if match is None:
            representatives.append(answer)
            match = len(representatives) - 1
        ids.append(match)
    return ids
