"""The performance benchmark's quick mode runs (CI-sized) and writes its table."""

import pytest

from benchmarks.perf import bench_drm


@pytest.mark.slow
def test_perf_benchmark_quick_mode(tmp_path):
    out = tmp_path / "perf.md"
    assert bench_drm.main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| 896x256 | 3 | horizontal |" in text
    for label in ("drm (vertical)", "drm (horizontal)", "ties", "task_arithmetic"):
        assert f"| {label} |" in text
    # float64 routes agree to 1e-8 (the exactness claim of the Gram route)
    kernel = text.split("## Kernel")[1].split("##")[0]
    rows = [line.split("|") for line in kernel.splitlines() if line.startswith("| ") and "x" in line.split("|")[1]]
    rows = [row for row in rows if row[1].strip()[0].isdigit()]
    assert len(rows) == 12 and all(float(row[7]) <= 1e-8 for row in rows)
    assert "## Memory of one tensor's merge" in text


@pytest.mark.slow
def test_mudsc_cost_benchmark_quick_mode(tmp_path):
    from benchmarks.perf import bench_mudsc

    out = tmp_path / "mudsc_scale.md"
    bench_mudsc.main(["--quick", "--out", str(out)])
    text = out.read_text()
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| 1.0 |") or line.startswith("| 0.5 |")]
    assert len(rows) == 2
    for row in rows:
        align_s, sweeps, rss = float(row[2]), int(row[4]), float(row[5])
        assert align_s > 0 and 1 <= sweeps <= 100 and rss > 100
    assert "`linear` merge of the same pair" in text
