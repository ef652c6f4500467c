"""`wmbench bench --peers`: the linear-recurrence pairs (wmbench/harness/peers_linear.py).

The peers are optional (flash-linear-attention, transformers, xlstm + mlstm_kernels: the `bench` extra):
every test that needs one skips without it, and the others check that a missing package (or a missing
backbone of ours) is listed with its reason instead of crashing."""
import importlib.util
import sys

import pytest
import torch

from wmbench.harness import peers, peers_linear
from wmbench.harness.peers import PAIRS, PeersConfig, PeerUnavailable, parse_pairs, run_cell, run_peers
from wmbench.report.peers import peers_markdown

NEW = {"fla-gdn": "ours:gated_deltanet", "hf-gdn": "ours:gated_deltanet", "fla-rwkv7": "ours:rwkv7",
       "xlstm": "ours:mlstm", "xlstm-large": "ours:mlstm", "mamba3": "ours:mamba3"}
PACKAGES = {"fla-gdn": ("einops",), "fla-rwkv7": ("einops",), "hf-gdn": ("transformers",), "xlstm": ("xlstm",),
            "xlstm-large": ("xlstm", "mlstm_kernels")}
TINY = dict(d_model=64, n_layers=2, threads=1, warmup=0, iters=1)


def test_the_new_pairs_are_listed():
    for pair, ours in NEW.items():
        p = PAIRS[pair]
        assert p.ours == ours and p.peer and p.package and "\n" not in p.what and p.what
        assert pair in parse_pairs("all") and pair in parse_pairs(None)
    assert parse_pairs("fla-gdn,xlstm") == ["fla-gdn", "xlstm"]
    peers.check_peers_config(PeersConfig(pairs=list(NEW), **TINY))
    shapes = PeersConfig().shapes
    assert shapes["fla-gdn"] == shapes["hf-gdn"] == shapes["xlstm-large"] == {"batch": 16, "lengths": [1664]}
    assert shapes["fla-rwkv7"]["lengths"] == shapes["xlstm"]["lengths"] == [1664]    # smaller batches only


def test_default_shapes_fit_in_24_gib():
    """The pre-run estimate of every new cell at its pair's default shape (so the guard lets it run on a
    24 GB machine); xlstm's parallel cell grows with L^2."""
    cfg = PeersConfig()
    for pair in NEW:
        B, L = cfg.shapes[pair]["batch"], cfg.shapes[pair]["lengths"][0]
        for impl in (PAIRS[pair].ours, PAIRS[pair].peer):
            if impl in peers_linear.IMPLS or impl in peers_linear.OURS:
                assert 0 < peers.memory_need(impl, cfg, B, L) < 20 * 2**30, (impl, B, L)
    assert peers.memory_need("xlstm", cfg, 1, 4000) > 2.5 * peers.memory_need("xlstm", cfg, 1, 2000)


def _only_ours_may_run(monkeypatch) -> list:
    """Cells are faked; a peer's cell fails the test. Returns the list of implementations run."""
    spawned = []

    def cell(module, payload, on_tick):
        assert payload["impl"].startswith("ours:"), f"the peer cell {payload['impl']} may not run"
        spawned.append(payload["impl"])
        return {"fwd_bwd_time": {"value": 1.0, "unit": "ms"}, "peak_memory": {"value": 1, "unit": "bytes"},
                "output_shape": [1, 16, 64], "output_finite": True}
    monkeypatch.setattr(peers, "run_cell_subprocess", cell)
    return spawned


def test_mamba3_has_no_cpu_peer(tmp_path, monkeypatch):
    with pytest.raises(PeerUnavailable, match="no installed CPU peer"):
        peers.probe_peer("mamba3")
    spawned = _only_ours_may_run(monkeypatch)
    rec, _ = run_peers(PeersConfig(pairs=["mamba3"], lengths=[16], batch_size=1, **TINY), runs_dir=tmp_path,
                       progress=False)
    entry = rec["metrics"]["pairs"]["mamba3"]
    assert spawned == ["ours:mamba3"]               # ours alone, to stand beside our Mamba-2
    assert entry["peer"]["status"] == "not installed" and set(entry["lengths"]["16"]) == {"ours"}
    assert "| mamba3 | mamba-ssm | | | not installed: no installed CPU peer" in peers_markdown([rec])


def test_missing_packages_are_listed_not_installed(tmp_path, monkeypatch):
    """No fla, transformers, xlstm or mlstm_kernels: each pair is 'not installed' with a one-line reason
    and no cell runs."""
    real = importlib.util.find_spec
    gone = {"fla", "transformers", "xlstm", "mlstm_kernels"}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.split(".")[0] in gone else real(name, *a))
    spawned = _only_ours_may_run(monkeypatch)
    pairs = ["fla-gdn", "hf-gdn", "fla-rwkv7", "xlstm", "xlstm-large"]
    rec, _ = run_peers(PeersConfig(pairs=pairs, lengths=[16], batch_size=1, **TINY), runs_dir=tmp_path,
                       progress=False)
    table = peers_markdown([rec])
    for pair in pairs:
        peer = rec["metrics"]["pairs"][pair]["peer"]
        assert peer["status"] == "not installed" and "no module named" in peer["reason"], peer
        assert "\n" not in peer["reason"] and f"| {pair} | {PAIRS[pair].package} | | | not installed: " in table


def test_a_failing_import_in_the_cell_is_not_installed(tmp_path, monkeypatch):
    """Found by the probe but not importable in the cell: 'not installed', no traceback. (fla's naive
    files are loaded by path: without einops they cannot run.)"""
    for mod in ("xlstm", "mlstm_kernels", "mlstm_kernels.torch", "transformers", "einops"):
        monkeypatch.setitem(sys.modules, mod, None)          # `import mod` raises ImportError
    fake = _fake_fla(tmp_path, "import einops\n")
    monkeypatch.setattr(peers_linear, "fla_naive_path", lambda pair: fake)
    cfg = PeersConfig(**TINY)
    for impl in ("xlstm", "xlstm-large", "hf-gdn", "fla-gdn"):
        out = run_cell(cfg, impl, 1, 8)
        assert list(out) == ["not_installed"] and "\n" not in out["not_installed"], (impl, out)


def test_our_missing_backbone_skips_the_pair(tmp_path, monkeypatch):
    def missing(impl):
        raise peers_linear.OursMissing(f"our backbone {impl.split(':')[1]!r} is not registered (simulated)")
    monkeypatch.setattr(peers_linear, "ours_available", missing)
    monkeypatch.setattr(peers_linear, "fla_naive_path", lambda pair: "/nowhere/naive.py")
    monkeypatch.setattr(peers, "_find", lambda module: None)
    monkeypatch.setattr(peers, "run_cell_subprocess", lambda *a, **k: pytest.fail("no cell may run"))
    rec, _ = run_peers(PeersConfig(pairs=["fla-gdn", "xlstm"], lengths=[16], batch_size=1, **TINY),
                       runs_dir=tmp_path, progress=False)
    table = peers_markdown([rec])
    for pair in ("fla-gdn", "xlstm"):
        peer = rec["metrics"]["pairs"][pair]["peer"]
        assert peer["status"] == "skipped" and "simulated" in peer["reason"]
        assert f"| {pair} | {PAIRS[pair].package} | | | skipped: our backbone" in table
    widths = {line.count("|") for line in table.splitlines() if line.startswith("| ")}
    assert len(widths) == 1


def test_ours_missing_names_the_backbone():
    with pytest.raises(peers_linear.OursMissing, match="'no_such_backbone'"):
        peers_linear.ours_available("ours:no_such_backbone")


# ---- fla's naive files, by path --------------------------------------------------------------------

def _fake_fla(root, body, rel="ops/gated_delta_rule/naive.py"):
    pkg = root / "fla"
    (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('fla/__init__.py must not run')\n")
    (pkg / rel).write_text(body)
    return pkg / rel


def test_fla_loader_runs_the_file_without_the_package(tmp_path, monkeypatch):
    path = _fake_fla(tmp_path, "def naive_chunk_gated_delta_rule(q, *a, **k):\n    return q * 2, None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = {k for k in sys.modules if k == "fla" or k.startswith("fla.")}
    assert peers_linear.fla_naive_path("fla-gdn") == path
    fn = peers_linear.load_fla_naive("fla-gdn")
    assert torch.equal(fn(torch.ones(2))[0], torch.full((2,), 2.0))
    assert {k for k in sys.modules if k == "fla" or k.startswith("fla.")} == before


@pytest.mark.parametrize("body, needle", [
    ("def naive_chunk_gated_delta_rule(:\n", "could not be loaded (SyntaxError"),
    ("import no_such_module_here\n", "could not be loaded (ModuleNotFoundError"),
    ("x = 1\n", "defines no naive_chunk_gated_delta_rule"),
])
def test_fla_loader_refuses_a_bad_file_in_one_line(tmp_path, monkeypatch, body, needle):
    path = _fake_fla(tmp_path, body)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PeerUnavailable) as e:
        peers_linear.load_fla_naive("fla-gdn")
    assert needle in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_fla_without_the_file_is_not_installed(tmp_path, monkeypatch):
    _fake_fla(tmp_path, "x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PeerUnavailable, match="has no ops/generalized_delta_rule/dplr/naive.py"):
        peers_linear.fla_naive_path("fla-rwkv7")


# ---- the installed peers at a tiny shape ------------------------------------------------------------

def _need(pair):
    for module in PACKAGES[pair]:
        pytest.importorskip(module)
    try:
        peers.probe_peer(pair)
    except PeerUnavailable as e:
        pytest.skip(f"{pair}: {e}")
    except peers_linear.OursMissing as e:
        pytest.skip(f"{pair}: {e}")


@pytest.mark.parametrize("pair", ["fla-gdn", "hf-gdn", "fla-rwkv7", "xlstm", "xlstm-large"])
def test_installed_peer_runs_fwd_bwd_at_a_tiny_shape(pair):
    """d_model 64, L 32, B 2: the peer builds, runs fwd+bwd, its output is finite and shaped as ours, its
    recurrence agrees with ours, and (where it is our layer) it has our parameter count."""
    _need(pair)
    cfg = PeersConfig(**TINY)
    torch.manual_seed(0)
    peer = run_cell(cfg, PAIRS[pair].peer, 2, 32)
    ours = run_cell(cfg, PAIRS[pair].ours, 2, 32)
    assert "not_installed" not in peer, peer
    for cell in (peer, ours):
        assert cell["output_shape"] == [2, 32, 64] and cell["output_finite"] is True
        assert cell["fwd_bwd_time"]["value"] > 0 and cell["n_params"]["value"] > 0
    assert peer["path"] == "torch"
    agree = peer["agreement"]
    assert agree["value"] <= 1e-5 * max(1.0, agree["scale"]) * (20 if pair.startswith("xlstm") else 1), agree
    if pair != "xlstm-large":      # xLSTM-Large's layer is another design (full q/k/v projections, no conv)
        assert peer["n_params"]["value"] == ours["n_params"]["value"], (pair, peer["n_params"], ours["n_params"])


def test_fla_gdn_layer_is_fla_math():
    """FlaGatedDeltaNet with fla's recurrence equals the same layer with ours (the layer math is shared,
    so the whole difference is the recurrence, which agrees)."""
    _need("fla-gdn")
    from wmbench.backbones.ops.delta_rule import gated_delta_rule
    naive = peers_linear.load_fla_naive("fla-gdn")
    torch.manual_seed(0)
    layer = peers_linear.FlaGatedDeltaNet(32, 2, 8, naive)
    x = torch.randn(2, 70, 32)
    with torch.no_grad():
        y_fla = layer(x)
        layer.naive = lambda q, k, v, g, beta, chunk_size: gated_delta_rule(q, k, v, g, beta)
        y_ours = layer(x)
    assert y_fla.shape == (2, 70, 32) and torch.allclose(y_fla, y_ours, atol=1e-5), (y_fla - y_ours).abs().max()
