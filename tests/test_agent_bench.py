"""`wmbench bench --agent`: every phase measured and positive, the phases add up to the update, FLOPs
counted, a record the report turns into a table and a plot; bad options refused before any work."""
import json
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    d = tmp_path_factory.mktemp("agent-bench")
    p = subprocess.run([sys.executable, "-m", "wmbench.cli", "bench", "--agent", "--size", "tiny",
                        "--backbones", "gru,mamba2", "--iters", "2", "--warmup", "1", "--threads", "1",
                        "--replay-capacity", "5000", "--no-progress", "--runs-dir", str(d / "runs")], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    path = p.stdout.strip().splitlines()[-1].split("record: ")[1]
    return d, json.loads(open(path).read())


def test_every_phase_measured(record):
    _, rec = record
    assert rec["kind"] == "agent-bench" and rec["environment"]["torch_threads"] == 1
    for b in ("gru", "mamba2"):
        cell = rec["metrics"]["cells"][b]
        phases = [cell[k]["value"] for k in ("wm_update", "imagine_context", "imagine_rollout", "ac_update")]
        assert all(v > 0 for v in phases)
        assert len(cell["wm_update"]["samples_ms"]) == 2
        assert cell["acting"]["value"] > 0 and cell["peak_memory"]["value"] > 0
        assert cell["update_flops"]["value"] > 1e6 and 0 < cell["fraction_of_matmul_peak"]["value"] < 1
        assert cell["threads"]["value"] == 1
        # the default precision is the atari command's auto choice, with its reason
        assert cell["precision"]["value"] in ("fp32", "bf16") and ":" in cell["precision"]["method"]
        # tiny's imagination batch is below where compiling was measured to pay: the atari command's
        # auto choice (eager) is what was measured, and the record says so
        assert cell["compiled"]["value"] is False and "imagination batch" in cell["compiled"]["method"]
        # a full replay buffer of the given capacity was resident, and the batches came from it
        from wmbench.world_model import get_preset
        m = get_preset("tiny")
        assert cell["replay_bytes"]["value"] == 5000 * m.image_size ** 2 * m.image_channels
        assert cell["peak_memory"]["value"] >= cell["replay_bytes"]["value"]
        assert cell["replay_sample"]["value"] > 0
        # the update is the median of per-update sums: between the sum of the phase minima and maxima
        lo = sum(min(cell[k]["samples_ms"]) for k in ("wm_update", "imagine_context", "imagine_rollout", "ac_update"))
        hi = sum(max(cell[k]["samples_ms"]) for k in ("wm_update", "imagine_context", "imagine_rollout", "ac_update"))
        assert lo - 1e-6 <= cell["update"]["value"] <= hi + 1e-6
        # the FLOP bound: the update's FLOPs at the best fp32 rate measured before and after the cells
        rate = rec["metrics"]["matmul_throughput"]
        assert len(rate["samples"]) == 2 and rate["value"] == max(rate["samples"])
        bound_s = cell["update_flops"]["value"] / rate["value"]
        assert cell["x_fp32_bound"]["value"] == pytest.approx(cell["update"]["value"] / 1e3 / bound_s)
        assert (cell["precision"]["value"] == "bf16") == ("x_bf16_bound" in cell)


def test_report_table_and_plot(record):
    from wmbench.report.tables import build_report
    d, _ = record
    paths, _ = build_report(d / "runs", d / "out")
    names = {p.name for p in paths}
    assert {"agent_bench.md", "agent_bench_phases.png"} <= names
    text = (d / "out" / "tables" / "agent_bench.md").read_text()
    assert "| gru |" in text and "| mamba2 |" in text and "imagination: rollout" in text


def test_plot_draws_the_newest_cell_per_bar_and_a_panel_per_size(tmp_path):
    """Many records of one configuration once piled into one bar (matplotlib merges equal category
    labels) and the cpu size's milliseconds vanished under XS's seconds."""
    from PIL import Image

    from wmbench.report.agent_bench import agent_bench_plot, latest_cells

    def cell(update_ms, precision="bf16", compiled=True):
        phases = {"wm_update": update_ms * 0.5, "imagine_context": update_ms * 0.2,
                  "imagine_rollout": update_ms * 0.2, "ac_update": update_ms * 0.1}
        return {**{k: {"value": v} for k, v in phases.items()}, "update": {"value": update_ms},
                "precision": {"value": precision}, "compiled": {"value": compiled}}

    def rec(size, when, cells, machine="AMD EPYC"):
        return {"config": {"size": size}, "created_at": when, "metrics": {"cells": cells},
                "environment": {"device_name": machine, "torch_threads": 2}}

    records = [rec("XS", "2026-12-01T08:00:00", {"mamba2": cell(25000, "fp32", False)}),
               rec("XS", "2026-12-01T23:51:00", {"mamba2": cell(9000)}),
               rec("XS", "2026-12-01T10:00:00", {"mamba2": cell(14000)}),       # older than 23:51: not drawn
               rec("cpu", "2026-12-01T23:57:00", {"gru": cell(250), "mamba2": {"error": "boom"}}),
               rec("XS", "2026-12-01T12:00:00", {"mamba2": cell(9500)}, machine="Intel Xeon")]
    panels = latest_cells(records)
    assert list(panels) == [("XS", "AMD EPYC", 2), ("XS", "Intel Xeon", 2), ("cpu", "AMD EPYC", 2)]
    xs = panels[("XS", "AMD EPYC", 2)]
    assert [c["update"]["value"] for c in xs.values()] == [9000, 25000]
    assert list(xs)[0].startswith("mamba2\nbf16, compiled\n2026-12-01 23:51")
    assert list(panels[("cpu", "AMD EPYC", 2)]) == ["gru\nbf16, compiled\n2026-12-01 23:57"]   # errors skipped
    out = agent_bench_plot(records, tmp_path / "p.png")
    w, h = Image.open(out).size
    assert w > h > 100
    with pytest.raises(ValueError, match="no agent-bench cell"):
        agent_bench_plot([rec("XS", "2026-12-01T08:00:00", {"gru": {"error": "x"}})], tmp_path / "q.png")


def test_forced_compile_is_measured_and_recorded(tmp_path):
    from wmbench.world_model.model import cxx_compiler
    if cxx_compiler() is None:
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    p = subprocess.run([sys.executable, "-m", "wmbench.cli", "bench", "--agent", "--size", "tiny", "--backbones",
                        "gru", "--iters", "1", "--warmup", "1", "--threads", "1", "--replay-capacity", "0",
                        "--compile", "--no-progress", "--runs-dir", str(tmp_path)], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    cell = json.loads(open(p.stdout.strip().splitlines()[-1].split("record: ")[1]).read())["metrics"]["cells"]["gru"]
    assert cell["compiled"]["value"] is True and cell["imagine_rollout"]["value"] > 0
    assert cell["update_flops"]["value"] > 1e6          # counted on the eager step, before compiling
    assert "| compiled |" in p.stdout


def test_forced_bf16_is_measured_and_recorded(tmp_path):
    p = subprocess.run([sys.executable, "-m", "wmbench.cli", "bench", "--agent", "--size", "tiny", "--backbones",
                        "gru", "--iters", "1", "--warmup", "1", "--threads", "1", "--replay-capacity", "0",
                        "--precision", "bf16", "--no-compile", "--no-progress", "--runs-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    rec = json.loads(open(p.stdout.strip().splitlines()[-1].split("record: ")[1]).read())
    cell = rec["metrics"]["cells"]["gru"]
    assert cell["precision"]["value"] == "bf16" and "--precision bf16 given" in cell["precision"]["method"]
    assert rec["metrics"]["matmul_throughput_bf16"]["value"] > 0       # the bf16 cell's bound is bf16's rate
    assert "bf16 matmul" in cell["fraction_of_matmul_peak"]["method"]
    bf16_rate = rec["metrics"]["matmul_throughput_bf16"]["value"]
    assert cell["fraction_of_matmul_peak"]["value"] == pytest.approx(cell["achieved_flops"]["value"] / bf16_rate)
    # one update time, two yardsticks: the ratios are in the ratio of the two matmul rates
    assert cell["x_bf16_bound"]["value"] / cell["x_fp32_bound"]["value"] == pytest.approx(
        bf16_rate / rec["metrics"]["matmul_throughput"]["value"])
    assert "| bf16 |" in p.stdout


@pytest.mark.parametrize("args,needle", [(["--size", "XXL"], "unknown preset"), (["--backbones", ""], "empty"),
                                         (["--iters", "0"], "--iters must be"),
                                         (["--replay-capacity", "-1"], "--replay-capacity must be")])
def test_bad_options(args, needle):
    p = subprocess.run([sys.executable, "-m", "wmbench.cli", "bench", "--agent", *args, "--check"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and needle in p.stderr
