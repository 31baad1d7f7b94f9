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
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| 256x") or line.startswith("| 896x")]
    assert rows and all(float(row[7]) <= 1e-8 for row in rows)
