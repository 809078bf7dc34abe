"""Tests for tasks.py: item generation and loading, prompts, grading and answer clusters."""

import json
import threading
from collections import Counter
from pathlib import Path

import pytest

from tasks import (
    Item,
    answers_equivalent,
    build_messages,
    cluster_by_answer,
    extract_answer,
    grade,
    load_items,
    make_arithmetic,
)


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------
# Arithmetic task
# ---------------------------------------------------------------------------


def test_arithmetic_is_deterministic_for_seed():
    assert make_arithmetic(50, seed=3) == make_arithmetic(50, seed=3)
    assert make_arithmetic(50, seed=3, split="test") == make_arithmetic(50, seed=3, split="test")


def test_arithmetic_seeds_give_different_items():
    assert make_arithmetic(50, seed=0) != make_arithmetic(50, seed=1)


def test_arithmetic_splits_share_no_question():
    test_questions = set()
    train_questions = set()
    for seed in range(3):
        test_questions |= {item.question for item in make_arithmetic(500, seed, split="test")}
        train_questions |= {item.question for item in make_arithmetic(2000, seed, split="train")}
    assert test_questions
    assert not test_questions & train_questions


def test_arithmetic_answers_match_expression():
    for split in ("train", "test"):
        for item in make_arithmetic(300, seed=0, split=split):
            assert item.question.startswith("What is ")
            assert item.question.endswith("?")
            expression = item.question.removeprefix("What is ").removesuffix("?")
            assert item.answer == str(eval(expression)), item


def test_arithmetic_levels_are_balanced():
    counts = Counter(item.level for item in make_arithmetic(101, seed=0))
    assert counts == {1: 21, 2: 20, 3: 20, 4: 20, 5: 20}


def test_arithmetic_pinned_items():
    # Values copied from a run and checked by hand. They pin the generator, because
    # a change to it changes every accuracy measured on the task.
    items = make_arithmetic(5, seed=0, split="train")
    assert [(item.level, item.question, item.answer) for item in items] == [
        (2, "What is 4 * 6?", "24"),
        (4, "What is 83 + 82?", "165"),
        (5, "What is (31 + 97) * 8?", "1024"),
        (1, "What is 4 + 4?", "8"),
        (3, "What is 86 * 3?", "258"),
    ]


def test_arithmetic_rejects_invalid_split():
    with pytest.raises(ValueError, match="'validation'"):
        make_arithmetic(10, seed=0, split="validation")


def test_arithmetic_rejects_nonpositive_n():
    with pytest.raises(ValueError, match="n=0"):
        make_arithmetic(0, seed=0)


# ---------------------------------------------------------------------------
# load_items
# ---------------------------------------------------------------------------


def test_arithmetic_default_sizes():
    assert len(load_items("arithmetic", split="train")) == 2000
    assert len(load_items("arithmetic", split="test")) == 200
    assert load_items("arithmetic", n=20, seed=4) == make_arithmetic(20, seed=4)


def test_unknown_task_lists_valid_tasks():
    with pytest.raises(ValueError, match="arithmetic, gsm8k, math500") as error:
        load_items("gsm9k")
    assert "'gsm9k'" in str(error.value)


def test_jsonl_gsm8k_final_answer_after_hashes(tmp_path):
    path = write_lines(
        tmp_path / "gsm8k.jsonl",
        [
            json.dumps({"question": "How many?", "answer": "She sold 48/2 = <<48/2=24>>24.\n#### 72"}),
            json.dumps({"question": "How much?", "answer": "Big sum.\n#### 1,234"}),
        ],
    )
    items = load_items("gsm8k", data=path)
    assert items == [Item("How many?", "72"), Item("How much?", "1234")]


def test_jsonl_custom_fields_and_numeric_answer(tmp_path):
    path = write_lines(tmp_path / "math.jsonl", [json.dumps({"problem": "1/2 + 1/2?", "solution": 1})])
    items = load_items("math500", data=path, question_field="problem", answer_field="solution")
    assert items == [Item("1/2 + 1/2?", "1")]


def test_jsonl_blank_lines_and_first_n(tmp_path):
    lines = ["", json.dumps({"question": "a", "answer": "1"}), "   ", json.dumps({"question": "b", "answer": "2"})]
    path = write_lines(tmp_path / "data.jsonl", lines + [json.dumps({"question": "c", "answer": "3"})])
    assert [item.question for item in load_items("gsm8k", data=path)] == ["a", "b", "c"]
    assert [item.question for item in load_items("gsm8k", data=path, n=2)] == ["a", "b"]


def test_jsonl_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_items("gsm8k", data=str(missing))


def test_jsonl_empty_file_is_rejected(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_items("gsm8k", data=str(empty))
    blank = write_lines(tmp_path / "blank.jsonl", ["", "  "])
    with pytest.raises(ValueError, match="empty"):
        load_items("gsm8k", data=blank)


def test_jsonl_malformed_line_is_numbered(tmp_path):
    good = json.dumps({"question": "q", "answer": "1"})
    path = write_lines(tmp_path / "bad.jsonl", [good, "", '{"question": "q", "answer": '])
    with pytest.raises(ValueError) as error:
        load_items("gsm8k", data=path)
    message = str(error.value)
    assert "bad.jsonl" in message
    assert "line 3" in message
    assert "invalid JSON" in message


def test_jsonl_missing_field_names_found_fields(tmp_path):
    path = write_lines(tmp_path / "fields.jsonl", [json.dumps({"problem": "q", "answer": "1"})])
    with pytest.raises(ValueError) as error:
        load_items("gsm8k", data=path)
    message = str(error.value)
    assert "line 1" in message
    assert "'question'" in message
    assert "'problem'" in message
    assert "--question-field" in message
    assert "--answer-field" in message


def test_jsonl_non_object_line_is_rejected(tmp_path):
    path = write_lines(tmp_path / "list.jsonl", ['["q", "1"]'])
    with pytest.raises(ValueError, match="line 1: expected a JSON object, got list"):
        load_items("gsm8k", data=path)


def test_hub_failure_suggests_local_data(monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(RuntimeError) as error:
        load_items("gsm8k", split="train")
    message = str(error.value)
    assert "openai/gsm8k" in message
    assert "HF_HUB_OFFLINE" in message
    assert "--data PATH" in message


def test_hub_rows_are_converted(monkeypatch):
    import datasets

    rows = [{"problem": "What is $1/2$ of 1?", "answer": "\\frac{1}{2}", "solution": "..."}]
    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_items("math500", split="test") == [Item("What is $1/2$ of 1?", "\\frac{1}{2}")]
    assert calls == [("HuggingFaceH4/MATH-500", None, "test")]


def test_math500_train_split_is_rejected():
    with pytest.raises(ValueError, match="no 'train' split"):
        load_items("math500", split="train")


# ---------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------


def test_build_messages_asks_for_boxed_answer():
    item = Item("What is 2 + 3?", "5", level=1)
    messages = build_messages(item, "arithmetic")
    assert messages == [{"role": "user", "content": "What is 2 + 3? Put the final answer in \\boxed{}."}]
    reasoning = build_messages(Item("A word problem.", "7"), "gsm8k")
    assert reasoning[-1]["role"] == "user"
    assert reasoning[-1]["content"].startswith("A word problem.\n")
    assert "\\boxed{}" in reasoning[-1]["content"]


def test_build_messages_rejects_unknown_task():
    with pytest.raises(ValueError, match="unknown task"):
        build_messages(Item("q", "1"), "trivia")


# ---------------------------------------------------------------------------
# Answer extraction and grading
# ---------------------------------------------------------------------------


def test_extract_answer_boxed_and_plain():
    assert extract_answer("so \\boxed{42}") == [42]
    assert extract_answer("so the answer is 42.") == [42]
    assert extract_answer("I do not know") is None
    assert extract_answer("") is None


@pytest.mark.parametrize(
    "completion",
    ["\\boxed{42}", "The answer is $\\boxed{42}$.", "so the answer is 42.", "6 * 7 = 42", "\\boxed{42.0}"],
)
def test_grade_accepts_correct_answer(completion):
    assert grade(completion, "42") == (1.0, True)


def test_grade_rejects_wrong_answer():
    assert grade("\\boxed{41}", "42") == (0.0, True)
    assert grade("6 * 7 = 41", "42") == (0.0, True)


def test_grade_unparsable_text_counts_as_unparsed():
    assert grade("I am not sure about this one", "42") == (0.0, False)
    assert grade("", "42") == (0.0, False)


def test_grade_accepts_equivalent_fraction():
    assert grade("1/2", "0.5") == (1.0, True)
    assert grade("0.5", "1/2") == (1.0, True)
    assert grade("\\boxed{\\frac{1}{2}}", "0.5") == (1.0, True)
    assert grade("\\boxed{0.5}", "\\frac{1}{2}") == (1.0, True)


def test_grade_ignores_thousands_separator():
    assert grade("\\boxed{1,234}", "1234") == (1.0, True)
    assert grade("The total is 1234.", "1,234") == (1.0, True)


def test_grade_prefers_boxed_over_later_number():
    assert grade("First 3 then 7, so \\boxed{10}. Check: 11", "10") == (1.0, True)


def test_grade_rejects_copied_expression():
    # An unevaluated expression would verify as equal to its value.
    assert grade("\\boxed{6 + 7 + 3}", "16") == (0.0, True)
    assert grade("\\boxed{83 * 2}", "166") == (0.0, True)
    assert grade("\\boxed{(12 + 30) * 4}", "168") == (0.0, True)
    assert grade("\\boxed{6 + 7 + 3 = 16}", "16") == (1.0, True)


def test_grade_keeps_symbolic_references():
    assert grade("\\boxed{3\\sqrt{13}}", "3\\sqrt{13}") == (1.0, True)
    assert grade("\\boxed{14/3}", "\\frac{14}{3}") == (1.0, True)
    assert grade("\\boxed{-7}", "-7") == (1.0, True)


@pytest.mark.parametrize(
    "completion",
    ["\\boxed{", "}}}{{{", "\\frac{1}{0}", "\\boxed{\\frac{1}{0}}", "$$$", "x" * 5000, "\\boxed{}", "1/0", "\x00\ud800"],
)
def test_grade_never_raises_on_odd_output(completion):
    reward, parsed = grade(completion, "42")
    assert reward == 0.0
    assert isinstance(parsed, bool)


def test_grade_works_off_main_thread():
    results = []
    worker = threading.Thread(target=lambda: results.append(grade("\\boxed{1/2}", "0.5")))
    worker.start()
    worker.join()
    assert results == [(1.0, True)]


def test_answers_equivalent_on_parsed_answers():
    assert answers_equivalent(extract_answer("1/2"), extract_answer("\\boxed{0.5}"))
    assert not answers_equivalent(extract_answer("1/2"), extract_answer("\\boxed{2}"))
    assert not answers_equivalent(None, extract_answer("2"))
    assert not answers_equivalent(None, None)


# ---------------------------------------------------------------------------
# Meaning clusters
# ---------------------------------------------------------------------------

COMPLETIONS = [
    "\\boxed{1/2}",  # cluster 0
    "so it is 0.5",  # same value as the first
    "\\boxed{3}",  # cluster 1
    "no idea",  # unparsable
    "The answer is 3.",  # same as the third
    "still no idea",  # unparsable
]


def test_cluster_by_answer_singleton_unparsed():
    assert cluster_by_answer(COMPLETIONS) == [0, 0, 1, 2, 1, 3]


def test_cluster_by_answer_shared_unparsed():
    assert cluster_by_answer(COMPLETIONS, unparsed="shared") == [0, 0, 1, 2, 1, 2]


def test_cluster_by_answer_edge_cases():
    assert cluster_by_answer([]) == []
    assert cluster_by_answer(["\\boxed{5}"] * 4) == [0, 0, 0, 0]
    assert cluster_by_answer(["1", "2", "3"]) == [0, 1, 2]


def test_cluster_by_answer_rejects_invalid_mode():
    with pytest.raises(ValueError, match="'ignore'"):
        cluster_by_answer(COMPLETIONS, unparsed="ignore")
