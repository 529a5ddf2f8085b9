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


def test_method_config_is_the_tasks(tmp_path):
    config = table2.method_config("tiny", "codi", str(tmp_path), steps=7, task="sr")
    assert config.task == "sr" and config.data.sr_degradation == "bicubic"  # the tiny SR config's own default


def test_gap_closed_is_the_share_of_the_teachers_few_step_gap():
    report = {"meta": {}, "finetune ddim": {"4": {"fid": 30.0}, "50": {"fid": 20.0}},
              "codi": {"4": {"fid": 21.0}}, "cm": {"4": {"fid": 32.0}}, "gd": {"2": {"fid": 1.0}}}
    gap = table2.gap_closed(report)
    assert gap["teacher_steps"] == [4, 50] and gap["codi"] == pytest.approx(0.9) and gap["cm"] == pytest.approx(-0.2)
    assert "gd" not in gap  # no 4-step row
    report["finetune ddim"]["50"]["fid"] = 31.0  # the teacher no better at 50 steps: nothing to close
    assert table2.gap_closed(report)["codi"] is None and "No gap-closed ratio" in table2._gap_markdown(
        {"gap_closed_fid": table2.gap_closed(report)})
