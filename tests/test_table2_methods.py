"""benchmarks/table2.py: every method of the miniature Table 2 and of its ablations is a valid config that carries
its switch (a typo in a dotted key, or a switch that finalize overrides, would silently measure the default)."""

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("table2", os.path.join(REPO, "benchmarks", "table2.py"))
table2 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(table2)


@pytest.mark.parametrize("name", sorted(table2.METHODS))
def test_method_config_carries_its_switches(name, tmp_path):
    config = table2.method_config("tiny", name, str(tmp_path), steps=7)
    assert config.total_steps == 7 and config.teacher == "builtin:scenes32"
    for key, value in table2.METHODS[name].items():
        node = config
        for part in key.split("."):
            node = node[part]
        assert node == (os.path.join(str(tmp_path), value[1:]) if key == "init_from" else value), key
