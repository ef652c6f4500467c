"""`wmbench bench --peers`: peer implementations side by side with ours, on tiny shapes.

Peers are optional: every test passes whether or not mambapy / transformers / mamba-ssm are installed
(an absent one must be listed as not installed, never crash)."""
import json
import sys
from dataclasses import asdict

import pytest
import torch

from wmbench.cli import main
from wmbench.core.records import load_records, make_record, write_record
from wmbench.harness import peers
from wmbench.harness.peers import PAIRS, PeersConfig, PeerUnavailable, load_ssd_minimal, run_peers
from wmbench.report.peers import peers_markdown

TINY = dict(lengths=[16], batch_size=1, d_model=64, n_layers=1, threads=1, warmup=0, iters=1)


def _not_installed(pair):
    raise PeerUnavailable(f"no module named {pair!r} (simulated)")


def _check_entry(entry, pair):
    """A pair is either measured (ours and the peer, same output shape, finite) or not installed with a reason."""
    assert entry["ours"] == PAIRS[pair].ours
    if entry["peer"]["status"] != "ok":
        assert entry["peer"]["status"] == "not installed" and entry["peer"]["reason"]
        return
    for L, cells in entry["lengths"].items():
        ours, peer = cells["ours"], cells["peer"]
        for c in (ours, peer):
            assert "error" not in c, c
            assert c["fwd_bwd_time"]["value"] > 0 and c["fwd_bwd_time"]["unit"] == "ms"
            assert len(c["fwd_bwd_time"]["samples_ms"]) == 1
            assert c["peak_memory"]["method"] == "rss_sampler" and c["output_finite"] is True
        assert peer["output_shape"] == ours["output_shape"] and peer["output_shape_matches_ours"] is True
        assert peer["time_ratio_to_ours"]["value"] == pytest.approx(
            peer["fwd_bwd_time"]["value"] / ours["fwd_bwd_time"]["value"])


def test_record_lists_every_pair_measured_or_not_installed(tmp_path, monkeypatch):
    """Real cells for mambapy and the SSD op (whichever are installed); the transformers pairs are made
    absent by the importer, so they are listed as not installed and cost no cell."""
    real_probe = peers.probe_peer
    monkeypatch.setattr(peers, "probe_peer", lambda p: _not_installed(p) if p.startswith("hf-") else real_probe(p))
    spawned = []
    real_cell = peers.run_cell_subprocess
    monkeypatch.setattr(peers, "run_cell_subprocess", lambda m, payload, on_tick: (
        spawned.append(payload["impl"]), real_cell(m, payload, on_tick))[1])
    cfg = PeersConfig(**TINY)
    rec, path = run_peers(cfg, runs_dir=tmp_path, progress=False)
    assert rec["kind"] == "peer-bench" and json.loads(open(path).read())["kind"] == "peer-bench"
    assert list(rec["metrics"]["pairs"]) == list(PAIRS)
    for pair, entry in rec["metrics"]["pairs"].items():
        _check_entry(entry, pair)
        if pair.startswith("hf-"):
            # the peer is absent: only ours is measured, beside our other backbones
            assert "simulated" in entry["peer"]["reason"]
            assert all(set(cells) == {"ours"} for cells in entry["lengths"].values())
    assert not any(i.startswith("hf-") for i in spawned)
    assert spawned.count("ours:mamba") <= 1            # shared by the mamba pairs: measured once per shape
    ssd = rec["metrics"]["pairs"]["ssd-minimal"]
    if ssd["peer"]["status"] == "ok":                   # the same function: it must agree with ours
        agree = ssd["lengths"]["16"]["peer"]["agreement"]
        assert agree["value"] <= 1e-4 * max(1.0, agree["scale"])
    table = peers_markdown([rec])
    for pair in PAIRS:
        assert f"| {pair} |" in table
    assert table.count("not installed: ") >= 3


def test_cell_reports_a_failing_import_as_not_installed(monkeypatch):
    """Found by the probe but not importable in the cell: the cell answers 'not installed', no traceback."""
    for mod in ("mambapy", "mambapy.mamba", "transformers"):
        monkeypatch.setitem(sys.modules, mod, None)       # `import mod` raises ImportError
    cfg = PeersConfig(**TINY)
    for impl in ("mambapy", "hf-mamba2"):
        out = peers.run_cell(cfg, impl, 1, 8)
        assert list(out) == ["not_installed"] and "import" in out["not_installed"], out


def test_run_lists_a_peer_whose_cell_import_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(peers, "probe_peer", lambda p: {"name": PAIRS[p].package, "version": "0"})
    fake = {"fwd_bwd_time": {"value": 2.0, "unit": "ms"}, "peak_memory": {"value": 10, "unit": "bytes"},
            "output_shape": [1, 16, 64], "output_finite": True}
    calls = []

    def cell(module, payload, on_tick):
        calls.append(payload["impl"])
        return dict(fake) if payload["impl"].startswith("ours:") else {"not_installed": "import x failed"}
    monkeypatch.setattr(peers, "run_cell_subprocess", cell)
    rec, _ = run_peers(PeersConfig(pairs=["mambapy"], **{**TINY, "lengths": [8, 16]}), runs_dir=tmp_path,
                       progress=False)
    entry = rec["metrics"]["pairs"]["mambapy"]
    assert entry["peer"] == {"name": "mambapy", "status": "not installed", "reason": "import x failed"}
    assert calls.count("mambapy") == 1                  # not tried again at the second length
    assert "not installed: import x failed" in peers_markdown([rec])


def test_a_cell_that_would_not_fit_is_skipped_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(peers, "probe_peer", lambda p: {"name": PAIRS[p].package, "version": "0"})
    monkeypatch.setattr(peers, "memory_available", lambda device: (1000, "RAM available"))
    monkeypatch.setattr(peers, "run_cell_subprocess", lambda *a, **k: pytest.fail("no cell may run"))
    rec, _ = run_peers(PeersConfig(pairs=["mambapy"], **TINY), runs_dir=tmp_path, progress=False)
    cells = rec["metrics"]["pairs"]["mambapy"]["lengths"]["16"]
    assert cells["peer"]["error"].startswith("skipped: needs about") and "RAM available" in cells["peer"]["error"]
    assert "skipped: needs about" in peers_markdown([rec])


def test_default_shapes_are_per_pair_and_options_override_them():
    cfg = PeersConfig()
    assert cfg.shapes["mambapy"] == {"batch": 4, "lengths": [1664]}
    assert cfg.shapes["hf-mamba2"] == {"batch": 16, "lengths": [1664]}
    assert cfg.shapes["ssd-minimal"] == {"batch": 16, "lengths": [1664]}
    cfg = PeersConfig(lengths=[8, 32], batch_size=2)
    assert all(s == {"batch": 2, "lengths": [8, 32]} for s in cfg.shapes.values())
    assert PeersConfig(**asdict(cfg)) == cfg            # what the cell rebuilds from its payload


# ---- mamba-ssm's ssd_minimal.py, by path --------------------------------------------------------------

def _fake_mamba_ssm(root, body):
    pkg = root / "mamba_ssm"
    (pkg / "modules").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('mamba_ssm/__init__.py must not run')\n")
    (pkg / "modules" / "ssd_minimal.py").write_text(body)
    return pkg / "modules" / "ssd_minimal.py"


FAKE = """
import torch
from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined   # CUDA-only, as the real file

def ssd_minimal_discrete(X, A, B, C, block_len, initial_states=None):
    return X * 2, mamba_chunk_scan_combined
"""


def test_loader_runs_the_file_without_the_package(tmp_path, monkeypatch):
    path = _fake_mamba_ssm(tmp_path, FAKE)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = {k for k in sys.modules if k.startswith("mamba_ssm")}
    assert peers.ssd_minimal_path() == path
    fn = load_ssd_minimal()
    y, stub = fn(torch.ones(2), None, None, None, 4)
    assert torch.equal(y, torch.full((2,), 2.0))
    with pytest.raises(RuntimeError, match="stub"):
        stub()
    assert {k for k in sys.modules if k.startswith("mamba_ssm")} == before    # nothing left behind
    if _has("einops"):
        assert peers.probe_peer("ssd-minimal")["file"] == str(path)


def _has(module):
    import importlib.util
    return importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("body, needle", [
    ("def ssd_minimal_discrete(:\n", "could not be loaded (SyntaxError"),
    ("raise OSError('disk on fire')\n", "could not be loaded (OSError: disk on fire)"),
    ("x = 1\n", "defines no ssd_minimal_discrete"),
    ("ssd_minimal_discrete = 3\n", "defines no ssd_minimal_discrete"),
])
def test_loader_refuses_a_corrupt_file_in_one_line(tmp_path, monkeypatch, body, needle):
    path = _fake_mamba_ssm(tmp_path, body)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PeerUnavailable) as e:
        load_ssd_minimal()
    assert needle in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_loader_refuses_a_missing_file(tmp_path, monkeypatch):
    path = _fake_mamba_ssm(tmp_path, FAKE)
    path.unlink()
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PeerUnavailable, match=r"has no modules/ssd_minimal.py"):
        load_ssd_minimal()
    with pytest.raises(PeerUnavailable, match="does not exist"):
        load_ssd_minimal(tmp_path / "nowhere.py")


def test_no_mamba_ssm_at_all_is_not_installed(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mamba_ssm" else real(name, *a))
    with pytest.raises(PeerUnavailable, match="no module named 'mamba_ssm'"):
        peers.probe_peer("ssd-minimal")


def test_installed_ssd_minimal_agrees_with_ours():
    """If mamba-ssm is installed here, its Listing-1 SSD and ours compute the same function."""
    try:
        fn = load_ssd_minimal()
    except PeerUnavailable as e:
        pytest.skip(f"mamba-ssm's ssd_minimal.py not usable here: {e}")
    agree = peers._ssd_agreement(peers._ssd_ref(fn, 8), PeersConfig(d_model=128, ssd_chunk=8), torch.device("cpu"))
    assert agree["value"] <= 1e-4 * max(1.0, agree["scale"])


# ---- the report and the command line ----------------------------------------------------------------

def _record():
    ours = {"fwd_bwd_time": {"value": 100.0, "unit": "ms"}, "peak_memory": {"value": 50 * 2**20, "unit": "bytes"},
            "n_params": {"value": 3_000_000, "unit": "parameters"}, "output_shape": [4, 1664, 512],
            "output_finite": True}
    peer = dict(ours, fwd_bwd_time={"value": 250.0, "unit": "ms"}, peak_memory={"value": 500 * 2**20, "unit": "bytes"},
                time_ratio_to_ours={"value": 2.5, "unit": "x"}, memory_ratio_to_ours={"value": 10.0, "unit": "x"},
                output_shape_matches_ours=True, path="torch", scan="sequential loop")
    pairs = {
        "hf-mamba-seq": {"what": "", "ours": "ours:mamba", "batch": 4, "lengths": {"1664": {"ours": ours, "peer": peer}},
                         "peer": {"name": "transformers", "version": "9.9", "status": "ok"}},
        "mambapy": {"what": "", "ours": "ours:mamba", "batch": 4, "lengths": {"1664": {"ours": ours, "peer": {"error": "OOM"}}},
                    "peer": {"name": "mambapy", "version": "1.2.0", "status": "ok"}},
        "ssd-minimal": {"what": "", "ours": "ours:ssd", "batch": 16, "lengths": {},
                        "peer": {"name": "mamba-ssm", "status": "not installed", "reason": "no module named 'mamba_ssm'"}},
    }
    cfg = asdict(PeersConfig(pairs=list(pairs)))
    return make_record("peer-bench", cfg, {"pairs": pairs})


def test_report_renders_a_peers_table(tmp_path):
    table = peers_markdown([_record()])
    assert "| hf-mamba-seq | wmbench mamba | 4 | 1664 | 100 | 1 (ours) | 50 | 1 (ours) | 3.00M |" in table
    assert "| hf-mamba-seq | transformers 9.9 MambaModel | 4 | 1664 | 250 | 2.50x | 500 | 10.00x |" in table
    assert "torch path; sequential loop" in table
    assert "| mambapy | mambapy 1.2.0 Mamba | 4 | 1664 | OOM |" in table
    assert "| ssd-minimal | mamba-ssm | | | not installed: no module named 'mamba_ssm' |" in table
    widths = {line.count("|") for line in table.splitlines() if line.startswith("| ")}
    assert len(widths) == 1                              # every row has the header's columns
    # and `wmbench report` writes it
    runs = tmp_path / "runs"
    write_record(_record(), runs, name="peer-bench-x")
    from wmbench.report.tables import build_report
    written, messages = build_report(str(runs), str(tmp_path / "out"))
    assert [p.name for p in written] == ["peers.md"] and not messages
    assert "wmbench mamba" in (tmp_path / "out" / "tables" / "peers.md").read_text()
    assert load_records(runs, kind="peer-bench")


def test_check_prints_the_config(tmp_path, capsys):
    assert main(["bench", "--peers", "--check", "--runs-dir", str(tmp_path)]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["pairs"] == list(PAIRS) and cfg["shapes"]["mambapy"] == {"batch": 4, "lengths": [1664]}
    assert main(["bench", "--peers", "mambapy,ssd-minimal", "--len", "64,128", "--batch", "2", "--threads", "1",
                 "--iters", "2", "--warmup", "0", "--check", "--no-progress", "--runs-dir", str(tmp_path)]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["pairs"] == ["mambapy", "ssd-minimal"] and cfg["iters"] == 2 and cfg["threads"] == 1
    assert cfg["shapes"] == {p: {"batch": 2, "lengths": [64, 128]} for p in ("mambapy", "ssd-minimal")}
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, needle", [
    (["--peers", "--agent"], "--peers and --agent"),
    (["--peers", "nope"], "unknown peer pair 'nope'; valid choices: all, mambapy"),
    (["--peers", "mambapy,mambapy"], "--peers repeats mambapy"),
    (["--peers", "--backbones", "gru"], "--backbones does not apply to --peers"),
    (["--peers", "--contexts", "8"], "--contexts does not apply to --peers"),
    (["--peers", "--dtype", "bf16"], "--dtype bf16 does not apply"),
    (["--peers", "--d-model", "100"], "multiple of headdim"),
    (["--peers", "--batch", "0"], "--batch"),
    (["--peers", "--len", "0"], "--len"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, args, needle):
    assert main(["bench", *args, "--check", "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_plain_bench_keeps_its_defaults(tmp_path, capsys):
    assert main(["bench", "--check", "--runs-dir", str(tmp_path)]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["lengths"] == [208, 1664] and cfg["batch_size"] == 16 and type(cfg["batch_size"]) is int
