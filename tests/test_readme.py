"""Every ```python block of README.md runs as written, and the two commands are the ones it names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", README, flags=re.S | re.M)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]


def test_readme_has_python_snippets():
    assert len(PYTHON) >= 2


@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_readme_python_snippet_runs(index, tmp_path, monkeypatch, one_thread):
    # A fresh namespace each, as a user pasting one block; files it writes land in tmp_path, and
    # the token cache (the BPE that one block trains) too.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SEDD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may download
    exec(compile(PYTHON[index], f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})


def test_readme_two_commands():
    section = README.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^```bash\n(.*?)^```", section, flags=re.S | re.M)
    assert len(commands) == 2, commands
    setup, tests = (c.strip() for c in commands)
    assert "\n" not in setup and "\n" not in tests  # one command line each
    assert "python3 -m venv .venv" in setup and 'pip install -e ".[dev]"' in setup
    assert setup.endswith("python train/run.py") and (ROOT / "train" / "run.py").is_file()
    assert tests.endswith("python -m pytest -q")
    # the dev extra installs what the second command runs
    dev = re.search(r"^dev = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), flags=re.S | re.M)
    assert dev and re.search(r"[\"']pytest[\"'<>=~ ]", dev.group(1)), "pytest is not in the dev extra"
