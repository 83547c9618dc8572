"""The distribution owns only its own import names, and the kernels stay below `sedd.ops`.

A top-level `kernels` package of ours once collided with Hugging Face's `kernels`, which
`transformers` requires: from the repository root every `transformers` model import failed, and a
regular install wrote one package over the other. These tests catch that class of bug.
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIST = "sedd-triton"


def _top_level_names(dist: metadata.Distribution) -> set[str]:
    text = dist.read_text("top_level.txt")
    if text:
        return {line.strip() for line in text.splitlines() if line.strip()}
    # Without top_level.txt: the first path component of every installed module.
    names = set()
    for f in dist.files or ():
        first = f.parts[0]
        if first.endswith((".dist-info", ".egg-info", ".pth")) or first == "__pycache__":
            continue
        names.add(first[:-3] if first.endswith(".py") else first)
    return names


def test_no_other_installed_distribution_provides_our_top_level_names():
    ours = _top_level_names(metadata.distribution(DIST))
    assert "sedd" in ours
    assert "kernels" not in ours, "the kernels are sedd.kernels; a top-level `kernels` is Hugging Face's"
    owners = metadata.packages_distributions()
    shared = {name: sorted(set(owners.get(name, [])) - {DIST}) for name in ours}
    assert not {n: d for n, d in shared.items() if d}, f"top-level names owned twice: {shared}"


@pytest.mark.slow
def test_a_built_wheel_holds_only_the_sedd_package(tmp_path):
    """What a regular `pip install .` writes: every top-level entry of the wheel."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "sedd", src / "sedd", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "wheel"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        top = {name.split("/")[0] for name in zf.namelist()}
        kernel_files = {n for n in zf.namelist() if n.startswith("sedd/kernels/")}
    assert {t for t in top if not t.endswith(".dist-info")} == {"sedd"}
    assert "sedd/kernels/__init__.py" in kernel_files and "sedd/kernels/score_entropy.py" in kernel_files


@pytest.mark.slow
def test_transformers_imports_from_the_repository_root():
    """`python -c` from the root puts the checkout first on sys.path, as pytest and notebooks do."""
    code = (
        "import importlib.util, pathlib\n"
        "from transformers import GPT2Config, GPT2LMHeadModel\n"
        "GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=11, n_positions=8))\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print('kernels:', spec.origin if spec and spec.origin else (list(spec.submodule_search_locations) if spec else None))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("kernels:")][-1]
    # Hugging Face's package (in an environment, which may sit inside the checkout), or none at all.
    ours = [p for p in line.split() if str(ROOT) in p and "site-packages" not in p]
    assert not ours, f"`import kernels` from the repository root resolves to our files: {line}"


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, 0, alias.name
        elif isinstance(node, ast.ImportFrom):
            yield node.lineno, node.level, node.module or ""


def test_the_kernels_import_nothing_of_sedd_outside_their_package():
    files = sorted((ROOT / "sedd" / "kernels").glob("*.py"))
    assert files
    bad = [
        f"{p.relative_to(ROOT)}:{line}: {'.' * level}{module}"
        for p in files
        for line, level, module in _imports(p)
        if level > 1 or (level == 0 and (module == "sedd" or module.startswith("sedd.")))
    ]
    assert not bad, bad


@pytest.mark.parametrize("room", ["sedd", "train", "benchmarks", "tests"])
def test_nothing_imports_a_top_level_kernels_module(room):
    bad = [
        f"{p.relative_to(ROOT)}:{line}"
        for p in sorted((ROOT / room).rglob("*.py"))
        for line, level, module in _imports(p)
        if level == 0 and (module == "kernels" or module.startswith("kernels."))
    ]
    assert not bad, bad
