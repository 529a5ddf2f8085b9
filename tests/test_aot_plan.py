"""The pod-plan benchmark's logic that does not need libtpu: the largest-batch search and the buffer-dump parser."""

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("aot_tpu", os.path.join(REPO, "benchmarks", "aot_tpu.py"))
aot_tpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(aot_tpu)


class FakePlanner:
    """Fits up to `limit` examples, with a memory curve as non-linear as the TPU compiler's."""

    def __init__(self, devices, limit):
        self.devices, self.limit, self.compiled = [None] * devices, limit, []

    def compile(self, batch):
        self.compiled.append(batch)
        return {"batch": batch, "fits": batch <= self.limit}


@pytest.mark.parametrize("devices,limit,expect", [
    (16, 528, (528, 544)),      # v4-32-like: goal fits, the bracket closes one device step apart
    (64, 2000, (1984, 2048)),
    (4, 64, (64, 68)),          # goal refused: halve, then bisect upwards
    (4, 0, (None, 4)),          # nothing fits, not even one example per device
])
def test_search_brackets_the_largest_fitting_batch(devices, limit, expect):
    planner = FakePlanner(devices, limit)
    trials, lo, hi = aot_tpu.search(planner, 256, 0, 20, lambda r: None)
    assert (lo, hi) == expect
    assert len(set(planner.compiled)) == len(planner.compiled)  # never the same batch twice
    assert all(b % devices == 0 for b in planner.compiled)


def test_search_stops_at_the_compile_budget():
    trials, lo, hi = aot_tpu.search(FakePlanner(16, 528), 256, 0, 3, lambda r: None)
    assert [t["batch"] for t in trials] == [256, 512, 1024] and (lo, hi) == (512, 1024)


def test_read_buffer_assignment(tmp_path):
    prefix = str(tmp_path / "module_0003.jit_train_step.after_optimizations")
    with open(prefix + "-buffer-assignment.txt", "w") as f:
        f.write("allocation 0: size 512, thread-local:\n"
                " value: <1 x @0> (size=512,offset=0): f32[128]{0}\n"
                "allocation 1: size 4096, parameter 3, shape |f32[1024]| at ShapeIndex {}:\n"
                "allocation 2: size 1000, maybe-live-out:\n"
                "allocation 3: size 16384, color 6, preallocated-temp:\n"  # another memory space: not HBM
                "allocation 4: size 100000, preallocated-temp:\n"
                "allocation 5: size 64, constant:\n")
    with open(prefix + "-memory-usage-report.txt", "w") as f:
        f.write("Memory Space: default (color=0)\nTotal bytes: 105672 (0.00GiB)\n")
    r = aot_tpu._read_buffer_assignment(prefix)
    assert (r["argument_bytes"], r["temp_bytes"], r["output_bytes"], r["other_bytes"]) == (4096, 100000, 1000, 576)
    assert r["total_bytes"] == 105672
    with open(prefix + "-memory-usage-report.txt", "w") as f:
        f.write("Total bytes: 999\n")
    with pytest.raises(RuntimeError, match="memory-usage report"):
        aot_tpu._read_buffer_assignment(prefix)


def test_search_resumes_from_earlier_trials():
    planner = FakePlanner(64, 2000)
    known = [{"batch": 256, "fits": True}, {"batch": 512, "fits": True}, {"batch": 5248, "fits": False}]
    trials, lo, hi = aot_tpu.search(planner, 256, 0, 20, lambda r: None, known)
    assert (lo, hi) == (1984, 2048)
    assert not set(planner.compiled) & {256, 512, 5248}  # earlier trials are not compiled again
    assert planner.compiled[0] == (512 + 5248) // 2 // 64 * 64


def test_summary_reports_the_goal_batch_and_a_labelled_step_time_estimate():
    row = {"trials": [
        {"batch": 512, "fits": False, "required_temp_gib": 31.0},
        {"batch": 256, "fits": True, "total_gib": 14.5, "total_bytes": 1, "flops_per_device": 101.28e12},
    ]}
    aot_tpu.summarize(row, 256)
    # 101.28 TFLOP per device at 40 % of 275 TFLOP/s: 0.9207 s per step, 256 images in it
    assert row["estimated_step_seconds"] == pytest.approx(0.9207, abs=1e-4)
    assert row["estimated_images_per_second"] == pytest.approx(278.0, abs=0.1)
    assert "not a measurement" in row["estimate"]
    assert (row["largest_batch_that_fits"], row["smallest_batch_that_does_not_fit"]) == (256, 512)
    assert [r["batch"] for r in row["trials"]] == [256, 512] and "estimated_step_seconds" not in row["trials"][1]
