"""The tables that README.md and docs/ quote from benchmarks/results/*.json are the JSON's, to the digit
(tools/results_tables.py generates them; a number typed by hand fails here)."""

import importlib.util
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("results_tables", os.path.join(REPO, "tools", "results_tables.py"))
results_tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(results_tables)


def _marked():
    out = []
    for path in results_tables.documents():
        with open(path) as f:
            text = f.read()
        out += [(path, text, m) for m in results_tables.BLOCK.finditer(text)]
    return out


def test_every_quoted_table_matches_its_json():
    assert _marked(), "no marked tables found: the check would pass on nothing"
    assert results_tables.main(["--check"]) == 0


def test_a_number_changed_by_hand_is_caught():
    # Each marked table with one digit of one number changed, as a hand edit would: the check names that table.
    for path, text, m in _marked():
        body = m["body"]
        number = re.search(r"\d+\.(\d)", body.split("\n", 2)[2])  # the first decimal number below the header
        start = m.start("body") + len(body.split("\n", 2)[0]) + len(body.split("\n", 2)[1]) + 2 + number.start(1)
        digit = text[start]
        edited = text[:start] + ("1" if digit != "1" else "2") + text[start + 1:]
        _, changed = results_tables.render(edited, path)
        assert changed == [m["name"]], (path, m["name"])


def test_a_table_the_script_does_not_know_is_an_error():
    with pytest.raises(SystemExit, match="no table 'nonesuch'"):
        results_tables.render("<!-- results: nonesuch -->\n| a |\n<!-- end results -->\n", "x.md")
