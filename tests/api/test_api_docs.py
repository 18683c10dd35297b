"""docs/api.md runs: its python blocks are executed in order, in one namespace, from the repository root.

Blocks preceded by ``<!-- test: slow -->`` (a small demo pipeline run) run only in the slow test; the others (NEXIS
in memory, logging) run in the default suite. ``/tmp/t2p-demo`` in the examples becomes a temporary folder.
"""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "api.md"
BLOCK = re.compile(r"(<!-- test: slow -->\s*\n)?```python\n(.*?)```", re.S)


def blocks(slow: bool):
    found = [(bool(m.group(1)), m.group(2)) for m in BLOCK.finditer(DOC.read_text(encoding="utf-8"))]
    assert found, "docs/api.md has no python blocks"
    return [code for is_slow, code in found if slow or not is_slow]


def _run(codes, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    namespace = {"__name__": "docs_api"}
    for i, code in enumerate(codes):
        code = code.replace("/tmp/t2p-demo", str(tmp_path / "t2p-demo"))
        exec(compile(code, f"docs/api.md block {i + 1}", "exec"), namespace)
    return namespace


def test_in_memory_examples(tmp_path, monkeypatch):
    ns = _run(blocks(slow=False), tmp_path, monkeypatch)
    assert sorted(ns["est"].selected_names_) == ["neuron_0", "neuron_3"]
    import logging

    assert logging.getLogger("tokens2policy").level == logging.INFO  # the last block restores the default


@pytest.mark.slow
def test_every_example_with_a_small_demo_pipeline(spark, tmp_path, monkeypatch):
    ns = _run(blocks(slow=True), tmp_path, monkeypatch)
    assert Path(ns["t2p"].report_path(ns["results"])).is_file()
