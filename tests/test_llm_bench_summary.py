"""The LLM benchmark's seed summary: two runs of the same seed (disjoint
--labels) side by side must both keep their rows."""

import json
import multiprocessing

from benchmarks.quality.llm.run import merge_into_summary


def _writer(path, name, n):
    rows = {"defaults": {}, "tuned": {}}
    for i in range(n):
        rows["defaults"][f"{name}{i}"] = {"test": {"t": i}}
        merge_into_summary(path, {"kind": "full", "seed": 0, "writer": name}, rows)


def test_rows_of_an_earlier_run_survive_a_later_write(tmp_path):
    path = tmp_path / "results" / "full-s0.json"
    merge_into_summary(path, {"kind": "full"}, {"defaults": {"ties": {"test": 1}}, "tuned": {}})
    # a second run, started before the first wrote anything, writes only its own rows
    merge_into_summary(path, {"kind": "full"}, {"defaults": {"drm-V": {"test": 2}},
                                                "tuned": {"drm-V": {"test": 3}}})
    summary = json.loads(path.read_text())
    assert summary["defaults"] == {"ties": {"test": 1}, "drm-V": {"test": 2}}
    assert summary["tuned"] == {"drm-V": {"test": 3}}


def test_concurrent_runs_lose_no_row(tmp_path):
    path = tmp_path / "full-s0.json"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, name, 40)) for name in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    rows = json.loads(path.read_text())["defaults"]
    assert set(rows) == {f"{n}{i}" for n in "ab" for i in range(40)}
