"""Tests that keep README.md true: the configuration table and the metrics glossary match the code."""
import dataclasses
import re
from pathlib import Path

import train

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def config_table():
    """The README's configuration table as train.Config defines it."""
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(train.Config):
        rows.append(f"| `--{f.name.replace('_', '-')}` | `{f.default!r}` | {f.metadata['help']} |")
    return "\n".join(rows)


def block(name):
    return re.search(rf"<!-- {name}:start -->\n(.*?)<!-- {name}:end -->", README, re.S).group(1).strip()


def test_readme_config_table_matches_config():
    assert block("config-table") == config_table(), "regenerate with: python -c 'import tests.test_readme as t; print(t.config_table())'"


def test_readme_glossary_covers_logged_metrics(tmp_path, monkeypatch):
    monkeypatch.setattr(train.tasks, "grade", lambda text, ref: (float(len(text) % 2), True))
    cfg = train.parse_args(["--model", "tiny", "--encoder", "tiny", "--steps", "1", "--prompts-per-step", "2",
                            "--group-size", "2", "--max-new-tokens", "4", "--micro-batch", "4", "--eval-items", "2",
                            "--mu", "2", "--beta", "0.1", "--out", str(tmp_path / "run")])
    keys = set()
    for line in open(train.train(cfg)):
        keys |= set(re.findall(r'"(\w+)":', line))
    documented = set(re.findall(r"`(\w+)`", block("metrics-glossary")))
    assert keys - documented == set()
