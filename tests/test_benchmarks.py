"""The benchmark scripts run (``--quick``: tiny shapes, a few repeats) and write well-formed rows,
so they cannot rot while the kernels change; report.py and the plot data read those rows back.

The scripts run in this process (importing lps_fast once), on CPU, into a temporary folder.
"""

import json
import sys
from pathlib import Path

import pytest

import lps_fast

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import bench_frame  # noqa: E402
import bench_gram_schmidt  # noqa: E402
import bench_permute  # noqa: E402
import bench_sinkhorn  # noqa: E402
import harness  # noqa: E402
import peers  # noqa: E402
import plot  # noqa: E402
import report  # noqa: E402
import summary  # noqa: E402

SCRIPTS = {
    "permute": bench_permute,
    "frame": bench_frame,
    "sinkhorn": bench_sinkhorn,
    "gram_schmidt": bench_gram_schmidt,
}
ROW_KEYS = {"run_id", "timestamp", "device", "machine", "family", "case", "scale", "shape", "provider", "mode",
            "status", "median_ms", "p20_ms", "p80_ms"}


def _fast_cpu_providers():
    provider = lps_fast._backend.providers.get("cpp")
    return ["cpp"] if provider is not None and provider.ops else []


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    """Every script once with --quick; {family: (rows returned, rows in the file)}."""
    folder = tmp_path_factory.mktemp("bench")
    results = {}
    for family, script in SCRIPTS.items():
        out = folder / f"{family}.jsonl"
        rows = script.main(["--quick", "--quiet", "--device", "cpu", "--out", str(out)])
        written = [json.loads(line) for line in out.read_text().splitlines()]
        results[family] = (rows, written)
    return folder, results


@pytest.mark.parametrize("family", list(SCRIPTS))
def test_quick_run_writes_rows(quick_results, family, capsys):
    _, results = quick_results
    rows, written = results[family]
    assert rows, "no rows"
    assert written == rows
    for row in rows:
        assert ROW_KEYS <= row.keys(), ROW_KEYS - row.keys()
        assert row["family"] == family and row["device"] == "cpu"
        assert row["status"] == "ok", row.get("error")
        assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        if row["mode"] in ("fwd", "full"):
            assert row["peak_MB"] >= 0
        if row["mode"] == "full":
            assert row["saved_MB"] >= 0 and row["out_MB"] > 0
    providers = {r["provider"] for r in rows}
    assert providers == {"reference", "gather", *_fast_cpu_providers()}
    cases = {r["case"] for r in rows}
    for case in cases:
        assert {r["mode"] for r in rows if r["case"] == case} == set(harness.MODES)


def test_every_op_is_benchmarked(quick_results):
    _, results = quick_results
    benchmarked = {row["op"] for rows, _ in results.values() for row in rows}
    assert benchmarked == set(lps_fast._ops.OP_NAMES)


def test_every_op_has_a_hand_written_peer():
    assert set(peers.PEERS) == set(lps_fast._ops.OP_NAMES)


def test_fastest_peer_and_copy_bound_targets():
    """The speedup is taken against the fastest peer; a forward at >= 0.8 of the copy bandwidth
    needs only >= 1x forward and >= 1.2x forward + backward."""
    def row(provider, mode, ms, case="op", gbps=None):
        return {"run_id": "r", "case": case, "op": case, "scale": "PATTERN", "mode": mode, "provider": provider,
                "status": "ok", "median_ms": ms, "gbps": gbps, "copy_gbps": 20.0}

    rows = [row("reference", "fwd", 10.0), row("gather+compile", "fwd", 1.0), row("gather", "fwd", 2.0),
            row("cpp", "fwd", 0.9, gbps=18.0),
            row("reference", "full", 10.0), row("gather+compile", "full", 2.0), row("cpp", "full", 1.8, gbps=None),
            row("reference", "fwd", 4.0, case="slow"), row("gather", "fwd", 2.0, case="slow"),
            row("cpp", "fwd", 1.0, case="slow", gbps=10.0)]
    verdicts = {(case, mode): (best, speedup, verdict)
                for case, _, mode, best, speedup, _, verdict in summary.peer_targets(rows)}
    assert verdicts[("op", "fwd")][:2] == ("gat+c", "1.11x")
    assert verdicts[("op", "fwd")][2].startswith("met (>= 1x, copy-bound")
    assert verdicts[("op", "full")][2].startswith("not met (>= 1.2x, copy-bound")
    assert verdicts[("slow", "fwd")] == ("gat", "2.00x", "met (>= 1.5x)")
    header, lines = summary.table(rows)
    assert "cpp vs best" in header and "cpp / copy" in header
    first = dict(zip(header, lines[0]))
    assert first["best"] == "gat+c" and first["cpp / copy"] == "0.90"


def test_report_and_plot_data(quick_results):
    folder, results = quick_results
    text = report.render(folder, "cpu")
    for family in SCRIPTS:
        assert f"### {family}" in text
    assert "| case | mode |" in text
    rows = [row for family_rows, _ in results.values() for row in family_rows]
    names = [name for name, _, _ in summary.targets(rows)]
    assert "permute_edges forward >= 10x at PATTERN" in names
    labels, values = plot.series(results["permute"][0], "fwd")
    assert labels and all(len(v) == len(labels) for v in values.values())
    assert "permute_edges" in summary.format_table(results["permute"][0])


def test_report_updates_marked_section(tmp_path, quick_results):
    folder, _ = quick_results
    doc = tmp_path / "BENCH.md"
    doc.write_text("intro\n<!-- results:cpu:begin -->\nold\n<!-- results:cpu:end -->\noutro\n")
    report.main(["--results", str(folder), "--update", str(doc)])
    content = doc.read_text()
    assert content.startswith("intro\n") and content.endswith("outro\n")
    assert "old" not in content and "### permute" in content


def test_gate_refuses_a_wrong_provider(monkeypatch):
    """A provider whose output differs from the reference is recorded as a mismatch, not timed."""
    original = harness.make_runner

    def wrong(provider, op):
        runner = original(provider, op)
        if provider != "cpp":
            return runner
        return harness.Runner(provider, lambda *args: runner.call(*args) * 1.001, provider)

    monkeypatch.setattr(harness, "make_runner", wrong)
    if not _fast_cpu_providers():
        pytest.skip("no CPU kernels")
    rows = bench_gram_schmidt.main(["--quick", "--quiet", "--out", "none", "--modes", "fwd"])
    cpp = [r for r in rows if r["provider"] == "cpp"]
    assert cpp and all(r["status"] == "mismatch" and r["median_ms"] is None for r in cpp)
    assert all(r["status"] == "ok" for r in rows if r["provider"] == "reference")


def test_timing_statistics():
    timing = harness.time_cpu(lambda: sum(range(100)), warmup=1, repeats=5, budget_s=0.01)
    assert 3 <= timing.repeats <= 5 and timing.inner >= 1
    assert 0 < timing.p20_ms <= timing.median_ms <= timing.p80_ms


def test_interleaved_timing_keeps_each_providers_count(monkeypatch):
    # every sample re-warms, however long a preempted call on a loaded machine takes
    monkeypatch.setattr(harness, "REWARM_BELOW_S", 60.0)
    calls = {"fast": 0, "slow": 0}

    def fast():
        calls["fast"] += 1

    def slow():
        calls["slow"] += 1
        sum(range(20_000))

    timings = harness.time_cpu_interleaved({"fast": fast, "slow": slow}, warmup=1, repeats=7, budget_s=10.0)
    assert timings["fast"].repeats == timings["slow"].repeats == 7
    assert timings["slow"].inner == 1 and timings["fast"].inner > 1
    assert timings["fast"].median_ms < timings["slow"].median_ms
    assert calls["slow"] == 2 + 2 * 7  # first call, estimate, then a re-warming call before each sample


@pytest.mark.slow
def test_compiled_reference_provider():
    """reference+compile and gather+compile: compiled once outside the timed region, gated, and
    timed in every mode."""
    rows = bench_gram_schmidt.main(["--quick", "--quiet", "--out", "none", "--providers",
                                    "reference,reference+compile,gather+compile", "--cases", "gram_schmidt/proper"])
    for provider in ("reference+compile", "gather+compile"):
        compiled = [r for r in rows if r["provider"] == provider]
        assert {r["mode"] for r in compiled} == set(harness.MODES)
        assert all(r["status"] == "ok" for r in compiled), [r.get("error") for r in compiled]


def test_plot_writes_png(quick_results, tmp_path):
    pytest.importorskip("matplotlib")
    folder, _ = quick_results
    written = plot.main(["--results", str(folder), "--outdir", str(tmp_path)])
    assert {p.name for p in written} == {f"{family}-cpu.png" for family in SCRIPTS}
    assert all(p.stat().st_size > 0 for p in written)


def test_training_step_benchmark_quick(tmp_path):
    """bench_step --quick: every distribution on the fast and the reference path of the n-body
    model, timed in alternating rounds, with a stage breakdown whose parts add up to the step."""
    import bench_step

    out = tmp_path / "step.jsonl"
    rows = bench_step.main(["--quick", "--quiet", "--tasks", "nbody", "--out", str(out)])
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert {(r["distribution"], r["path"]) for r in rows} == {
        (d, p) for d in bench_step.DISTRIBUTIONS for p in ("fast", "reference")}
    for row in rows:
        assert row["status"] == "ok" and row["task"] == "nbody" and row["rounds"] == 3
        assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        stages = row["stages_ms"]
        assert set(stages) == set(bench_step.STAGES) | {"total"}
        assert all(stages[s] >= 0 for s in bench_step.STAGES if s != "other")
        if row["distribution"] == "learned":
            assert stages["distribution"] > 0 and stages["transform"] > 0
    table = bench_step.format_table(rows)
    assert "learned" in table and "backbone ms" in table
    assert any("learned step / uniform step" in line for line in bench_step.ratios(rows))
    # report.py renders the latest full run only: quick rows are smoke tests
    assert report.render_step(tmp_path) is None
    out.write_text("".join(json.dumps({**r, "quick": False}) + "\n" for r in rows))
    rendered = report.render_step(tmp_path)
    assert "| nbody | learned | fast |" in rendered and "learned step / none step" in rendered


def test_training_step_benchmark_with_the_paper_preset(tmp_path):
    """--preset paper builds the paper's own model (a pair transformer for n-body), and its rows
    are a table part of their own beside the default run of the same task."""
    import bench_step

    out = tmp_path / "step.jsonl"
    rows = bench_step.main(["--quick", "--quiet", "--tasks", "nbody", "--preset", "paper", "--paths", "fast",
                            "--distributions", "learned,uniform", "--out", str(out)])
    assert {r["preset"] for r in rows} == {"paper"} and {r["status"] for r in rows} == {"ok"}
    assert {r["backbone"] for r in rows} == {"pair-transformer"}
    assert all(bench_step.label(r) == "nbody@paper" for r in rows)
    default = [{**r, "preset": None, "median_ms": 2 * r["median_ms"]} for r in rows]
    out.write_text("".join(json.dumps({**r, "quick": False}) + "\n" for r in rows + default))
    rendered = report.render_step(tmp_path)
    assert "Run (nbody@paper)" in rendered and "Run (nbody)" in rendered
    assert "| nbody@paper | learned | fast |" in rendered and "| nbody | learned | fast |" in rendered
    assert "nbody@paper: learned step / uniform step" in rendered


def test_vn_network_benchmark_quick(tmp_path):
    """bench_vn --quick: the distribution network on the composed and the fused layers, both past
    the agreement gate and timed, and report.py's rendering of a full run."""
    import bench_vn

    out = tmp_path / "vn.jsonl"
    rows = bench_vn.main(["--quick", "--out", str(out)])
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert {(r["provider"], r["mode"]) for r in rows} == {(p, m) for p in ("composed", "fused") for m in bench_vn.MODES}
    for row in rows:
        assert row["status"] == "ok" and row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
    assert harness.exit_status(rows) == 0
    assert harness.exit_status([{**rows[0], "status": "mismatch", "error": "output 0"}]) == 1
    assert report.render_vn(tmp_path) is None  # quick rows are smoke tests
    out.write_text("".join(json.dumps({**r, "quick": False}) + "\n" for r in rows))
    rendered = report.render_vn(tmp_path)
    assert "| tiny | full |" in rendered and "fused vs composed" in rendered


def test_vn_matmul_benchmark_quick(tmp_path):
    """bench_vn_matmul --quick: vn_matmul and its eager peer past the float64 gate and timed."""
    import bench_vn_matmul

    out = tmp_path / "vn_matmul.jsonl"
    rows = bench_vn_matmul.main(["--quick", "--out", str(out)])
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert {(r["provider"], r["mode"]) for r in rows} == {(p, m) for p in ("torch", "vn_matmul")
                                                          for m in bench_vn_matmul.MODES}
    for row in rows:
        assert row["status"] == "ok" and row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
    assert harness.exit_status(rows) == 0
    assert "vs best peer" in bench_vn_matmul.format_table(rows, markdown=True)
