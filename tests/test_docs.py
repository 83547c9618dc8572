"""The math the code cites is in the repository: every citation of docs/math.md names one of its
sections, and no file points at a document a clone does not contain."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r'docs/math\.md, ((?:"[^"]+"(?:, )?)+)')


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True)
    if out.returncode == 0 and out.stdout.strip():
        return [ROOT / f for f in out.stdout.split()]
    # a copy without .git (the device check's): every file on disk
    return [p for pat in patterns for p in ROOT.rglob(pat) if ".venv" not in p.parts]


def _sections() -> set[str]:
    text = (ROOT / "docs" / "math.md").read_text()
    return {line[3:].strip() for line in text.splitlines() if line.startswith("## ")}


def test_every_citation_names_a_section_of_docs_math():
    sections = _sections()
    assert {"Score entropy", "Reverse steps", "Likelihood bound", "Conditioning"} <= sections
    cited, bad = 0, []
    for path in _tracked("*.py", "*.md"):
        if path.name == "math.md" or "results" in path.parts:
            continue
        for group in CITATION.findall(path.read_text(encoding="utf-8")):
            for name in re.findall(r'"([^"]+)"', group):
                cited += 1
                if name not in sections:
                    bad.append(f"{path.relative_to(ROOT)}: {name!r}")
    assert cited >= 20 and not bad, bad


def test_no_file_cites_a_document_outside_the_repository():
    bad = [
        str(path.relative_to(ROOT))
        for path in _tracked("*.py", "*.md", "*.sh", "*.toml")
        if "results" not in path.parts and path.name != Path(__file__).name and re.search(r"sedd-math\.md|shared/docs", path.read_text(encoding="utf-8"))
    ]
    assert not bad, bad


def test_what_users_read_never_points_at_the_test_data_beside_the_checkout():
    # ../shared/data exists on the project's machines only: the library, the entry points' help and
    # messages, and the READMEs must not send a user there (tests may read it)
    bad = [
        str(path.relative_to(ROOT))
        for path in _tracked("sedd/*.py", "train/*.py", "*.md")
        if "results" not in path.parts and "tests" not in path.parts
        and re.search(r"shared/data", path.read_text(encoding="utf-8"))
    ]
    assert not bad, bad
