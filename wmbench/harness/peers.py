"""`wmbench bench --peers`: other installed implementations of the same layers, timed side by side with
ours at the same shapes, in one record (kind "peer-bench").

Pairs (each peer is optional: one that cannot be imported is listed as "not installed: <reason>"):

    mambapy       mambapy.mamba.Mamba (pure PyTorch Mamba-1, parallel scan)   vs our `mamba` backbone
    hf-mamba      transformers' MambaModel, PyTorch path with use_mambapy=True vs our `mamba` backbone
                  (transformers' documented training fallback without CUDA: mambapy's parallel scan)
    hf-mamba-seq  transformers' MambaModel, PyTorch path, its default          vs our `mamba` backbone
                  use_mambapy=False: a Python loop over time steps, whose backward is quadratic in L
                  (each step's slice of the (B, d_inner, L, N) tensors back-propagates as a full-size
                  tensor), so its default length is short
    hf-mamba2     transformers' Mamba2Model, its PyTorch path (chunked SSD)    vs our `mamba2` backbone
    ssd-minimal   mamba-ssm's ssd_minimal_discrete (the paper's Listing 1)    vs our chunked SSD (ssd_scan)

and the linear-recurrence pairs, in wmbench/harness/peers_linear.py (its docstring says how each runs on a CPU):

    fla-gdn       fla's Gated DeltaNet layer math around fla's naive_chunk_gated_delta_rule vs our gated_deltanet
    hf-gdn        transformers' Qwen3NextGatedDeltaNet layers, PyTorch path            vs our gated_deltanet
    fla-rwkv7     fla's RWKV7Attention layer math around fla's dplr_chunkwise           vs our rwkv7
    xlstm         xlstm's xLSTMBlockStack of mLSTM blocks (parallel cell, quadratic)    vs our mlstm
    xlstm-large   xLSTM-Large's mLSTMLayer, mlstm_kernels chunkwise--native_autograd   vs our mlstm
    mamba3        listed as "no installed CPU peer"                                     (our mamba3)

A pair whose side of ours is not registered in this wmbench is listed as skipped, with the reason.

The model pairs time fwd+bwd of an n_layers stack at width d_model on a (B, L, d_model) input; the SSD
pair times the scan alone (fwd+bwd with respect to x, dt, A, B, C), heads = expand*d_model/headdim.
Every implementation runs in its own fresh process (wmbench/harness/cells.py): its peak memory (RSS
sampling) is its own and an out-of-memory kill costs one cell. A cell whose estimated memory exceeds
what is available is skipped with the reason instead of run. Weights differ between implementations, so
outputs are not compared, except for the SSD op, which is the same function of the same inputs: its
agreement with ours is checked on a small input (as is the recurrence alone of each linear-recurrence
peer). Every cell records its output shape and whether the output was finite.

mamba-ssm's package __init__ imports its CUDA extensions, so its ssd_minimal.py is loaded by path
(`load_ssd_minimal`) without executing the package; the file's one import of the Triton kernel (used only
by its self-test) is satisfied by a stub that refuses to run.
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import sys
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from wmbench.core import allocator
from wmbench.core.errors import UserError
from wmbench.core.measure import PeakMemory, median, metric, time_calls
from wmbench.harness import peers_linear
from wmbench.harness.cells import run_cell_subprocess, save_cells_record, tick

HEADDIM, D_STATE, EXPAND = 128, 16, 2      # our mamba2 defaults (and mamba's d_state, expand)


@dataclass(frozen=True)
class Pair:
    ours: str          # our implementation's cell id
    peer: str          # the peer's cell id
    package: str       # the distribution the peer comes from
    batch: int         # default batch
    length: int        # default sequence length
    what: str


PAIRS: dict[str, Pair] = {
    # mambapy materialises (B, L, d_inner, d_state) tensors ~9x over per layer: B 16 at L 1664 OOMs in 24 GB
    "mambapy": Pair("ours:mamba", "mambapy", "mambapy", 4, 1664,
                    "Mamba-1 stack, fwd+bwd: mambapy.mamba.Mamba (pure PyTorch, parallel scan) vs our mamba"),
    "hf-mamba": Pair("ours:mamba", "hf-mamba", "transformers", 4, 1664,
                     "Mamba-1 stack, fwd+bwd: transformers MambaModel on inputs_embeds (PyTorch path, "
                     "use_mambapy=True: mambapy's parallel scan) vs our mamba"),
    # 8.6 s per fwd+bwd at B 4, L 208 on one core; the backward grows at least quadratically in L (one
    # layer, B 1: 0.9 s at L 208, 4.1 s at 416, 71 s at 832), so L 1664 would take hours
    "hf-mamba-seq": Pair("ours:mamba", "hf-mamba-seq", "transformers", 4, 208,
                         "Mamba-1 stack, fwd+bwd: transformers MambaModel on inputs_embeds (PyTorch path, its "
                         "default use_mambapy=False: sequential loop) vs our mamba"),
    "hf-mamba2": Pair("ours:mamba2", "hf-mamba2", "transformers", 16, 1664,
                      "Mamba-2 stack, fwd+bwd: transformers Mamba2Model on inputs_embeds (PyTorch path) vs our mamba2"),
    "ssd-minimal": Pair("ours:ssd", "ssd-minimal", "mamba-ssm", 16, 1664,
                        "SSD op alone, fwd+bwd: mamba-ssm ssd_minimal_discrete vs our chunked ssd_scan"),
    **{name: Pair(*spec) for name, spec in peers_linear.SPECS.items()},
}


# peak bytes per (token x layer) measured on CPU at d_model 512 (in the comments, in units of di*N*4 or di*4
# bytes: at B 2, L 416 / at the pair's default shape), rounded up: the memory check's estimate
# (`di` = expand*d_model, N = d_state)
def _bytes_per_token_layer(impl: str, d: int) -> float:
    di = EXPAND * d
    return {
        "mambapy": 14 * di * D_STATE * 4,       # pscan's (B, L, di, N) tensors: 9.3 / 11.5
        "hf-mamba": 14 * di * D_STATE * 4,      # the same pscan inside transformers: - / 11.6
        "hf-mamba-seq": 12 * di * D_STATE * 4,  # discretised A, B*x, per-step states and their grads: 6.8 / 11.0
        "hf-mamba2": 48 * di * 4,               # 38 / 32
        "ssd-minimal": 24 * di * 4,             # 18 / 21 (one layer: the op alone)
        "ours:mamba": 48 * di * 4,              # 39 / 34 (43 at L 208)
        "ours:mamba2": 24 * di * 4,             # 17 / 16
        "ours:ssd": 16 * di * 4,                # 12 / 9
    }[impl]


class PeerUnavailable(Exception):
    """A peer that cannot be used here; str() is the one-line reason."""


@dataclass
class PeersConfig:
    pairs: list[str] = field(default_factory=lambda: list(PAIRS))
    lengths: list[int] | None = None   # None: each pair's default length
    batch_size: int | None = None      # None: each pair's default batch
    d_model: int = 512
    n_layers: int = 2
    device: str = "cpu"
    threads: int = 0                   # torch CPU threads in each cell (0: torch's default)
    warmup: int = 1
    iters: int = 3
    ssd_chunk: int = 32                # chunk (block) length of both SSD implementations
    seed: int = 0
    shapes: dict = field(default_factory=dict)   # pair -> {"batch", "lengths"}, resolved from the above

    def __post_init__(self):
        if not self.shapes:
            self.shapes = {p: {"batch": self.batch_size if self.batch_size is not None else PAIRS[p].batch,
                               "lengths": list(self.lengths) if self.lengths is not None else [PAIRS[p].length]}
                           for p in self.pairs if p in PAIRS}


def parse_pairs(text: str | None) -> list[str]:
    """`--peers` / `--peers all` -> every pair; `--peers a,b` -> those (checked by check_peers_config)."""
    names = [s.strip() for s in ("all" if text is None else text).split(",") if s.strip()]
    if names == ["all"]:
        return list(PAIRS)
    return names


def check_peers_config(cfg: PeersConfig) -> None:
    """Every field, before any work: one-line UserError naming the option."""
    from wmbench.core.device import resolve_device
    if not cfg.pairs:
        raise UserError("--peers is empty; valid choices: all, " + ", ".join(PAIRS))
    bad = [p for p in cfg.pairs if p not in PAIRS]
    if bad:
        raise UserError(f"unknown peer pair {bad[0]!r}; valid choices: all, " + ", ".join(PAIRS))
    dup = sorted({p for p in cfg.pairs if cfg.pairs.count(p) > 1})
    if dup:
        raise UserError(f"--peers repeats {', '.join(dup)}")
    for flag, v, lo in (("--d-model", cfg.d_model, 1), ("--layers", cfg.n_layers, 1), ("--iters", cfg.iters, 1),
                        ("--warmup", cfg.warmup, 0), ("--threads", cfg.threads, 0),
                        ("ssd_chunk", cfg.ssd_chunk, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise UserError(f"{flag} must be an integer >= {lo}, got {v!r}")
    if cfg.batch_size is not None and (not isinstance(cfg.batch_size, int) or cfg.batch_size <= 0):
        raise UserError(f"--batch must be a positive integer, got {cfg.batch_size!r}")
    if cfg.lengths is not None and (not cfg.lengths or min(cfg.lengths) <= 0):
        raise UserError("--len must be a non-empty list of positive integers")
    if any(p in cfg.pairs for p in ("hf-mamba2", "ssd-minimal")) and (EXPAND * cfg.d_model) % HEADDIM:
        raise UserError(f"--d-model {cfg.d_model}: the Mamba-2 pairs need expand*d_model = {EXPAND * cfg.d_model} "
                        f"to be a multiple of headdim = {HEADDIM}")
    resolve_device(cfg.device)


# --------------------------------------------------------------------------------------------------
# finding the peers
# --------------------------------------------------------------------------------------------------

def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _find(module: str) -> importlib.machinery.ModuleSpec:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as e:
        raise PeerUnavailable(f"{module} cannot be located ({type(e).__name__}: {_first_line(e)})") from None
    if spec is None:
        raise PeerUnavailable(f"no module named {module!r}")
    return spec


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def ssd_minimal_path() -> Path:
    """mamba_ssm/modules/ssd_minimal.py of the installed mamba-ssm, found without importing the package."""
    spec = _find("mamba_ssm")
    for loc in spec.submodule_search_locations or []:
        path = Path(loc) / "modules" / "ssd_minimal.py"
        if path.is_file():
            return path
    where = ", ".join(spec.submodule_search_locations or []) or str(spec.origin)
    raise PeerUnavailable(f"mamba_ssm at {where} has no modules/ssd_minimal.py")


class _StubFinder:
    """Answers imports under `prefix` (while a file is loaded by path) with empty modules whose every
    attribute is a function that refuses to run: mamba_ssm's __init__ and its Triton/CUDA modules never execute."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.made: list[str] = []

    def find_spec(self, name, path=None, target=None):
        if name == self.prefix or name.startswith(self.prefix + "."):
            return importlib.util.spec_from_loader(name, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = _StubModule(spec.name)
        mod.__path__ = []
        self.made.append(spec.name)
        return mod

    def exec_module(self, module):
        pass


class _StubModule(types.ModuleType):
    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        name = f"{self.__name__}.{attr}"

        def unavailable(*args, **kwargs):
            raise RuntimeError(f"{name} is a stub: wmbench loads mamba-ssm's ssd_minimal.py without its kernels")
        return unavailable


def load_ssd_minimal(path: str | Path | None = None):
    """mamba-ssm's `ssd_minimal_discrete`, from `path` (default: the installed package's file), loaded
    with importlib without executing mamba_ssm/__init__.py. PeerUnavailable (one line) if the file is
    missing, does not load, or lacks the function."""
    path = Path(path) if path is not None else ssd_minimal_path()
    if not path.is_file():
        raise PeerUnavailable(f"{path} does not exist")
    name = "_wmbench_peer_ssd_minimal"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PeerUnavailable(f"{path} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    finder = _StubFinder("mamba_ssm")
    saved = {k: v for k, v in sys.modules.items() if k == "mamba_ssm" or k.startswith("mamba_ssm.")}
    for k in saved:
        del sys.modules[k]
    sys.meta_path.insert(0, finder)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file: its error, in one line
        raise PeerUnavailable(f"{path} could not be loaded ({type(e).__name__}: {_first_line(e)})") from None
    finally:
        sys.meta_path.remove(finder)
        for k in finder.made:
            sys.modules.pop(k, None)
        sys.modules.update(saved)
    fn = getattr(module, "ssd_minimal_discrete", None)
    if not callable(fn):
        raise PeerUnavailable(f"{path} defines no ssd_minimal_discrete function")
    return fn


def probe_peer(pair: str) -> dict:
    """Is the peer of `pair` here? Cheap (finds it, imports nothing): {"name", "version"}; PeerUnavailable
    with the reason if not. The cell's real import can still fail: it reports that as not installed too."""
    p = PAIRS[pair]
    if pair in peers_linear.SPECS:
        return peers_linear.probe(pair)
    if pair == "ssd-minimal":
        path = ssd_minimal_path()
        _find("einops")   # the file's one dependency besides torch
        return {"name": p.package, "version": _version(p.package), "file": str(path)}
    if pair in ("mambapy", "hf-mamba"):    # hf-mamba: transformers' use_mambapy fallback needs mambapy
        _find("mambapy")
    if pair != "mambapy":
        _find("transformers")
    return {"name": p.package, "version": _version(p.package)}


# --------------------------------------------------------------------------------------------------
# one cell: one implementation at one shape, in this process
# --------------------------------------------------------------------------------------------------

def _hf_paths(modeling) -> dict[str, str]:
    """transformers' kernel-or-torch functions in a modeling module -> "torch" (its reference PyTorch
    fallback) or "kernel" (mamba-ssm / causal-conv1d / a hub kernel). transformers >= 5 decides per
    function at import (a closure flag); older versions have one is_fast_path_available flag."""
    out = {}
    for name, obj in vars(modeling).items():
        code, cells = getattr(obj, "__code__", None), getattr(obj, "__closure__", None)
        if code is None or not cells:
            continue
        free = dict(zip(code.co_freevars, cells))
        if "is_new_implementation" in free:
            try:
                out[name] = "kernel" if free["is_new_implementation"].cell_contents else "torch"
            except ValueError:     # an empty cell
                continue
    if not out and hasattr(modeling, "is_fast_path_available"):
        out["fast_path"] = "kernel" if modeling.is_fast_path_available else "torch"
    return out


def _build_hf(impl: str, cfg: PeersConfig, dev, x):
    """transformers' model built from its config at our sizes, and which path its forward took."""
    import logging

    import transformers
    messages: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Catch(logging.WARNING)
    logging.getLogger("transformers").addHandler(handler)
    common = dict(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, state_size=D_STATE, expand=EXPAND,
                  conv_kernel=4, vocab_size=1, use_cache=False)   # vocab 1: inputs_embeds, no embedding table
    if impl in ("hf-mamba", "hf-mamba-seq"):
        from transformers.models.mamba import modeling_mamba as modeling
        hf_cfg = transformers.MambaConfig(**common, use_mambapy=impl == "hf-mamba")
        if impl == "hf-mamba" and not getattr(modeling, "is_mambapy_available", lambda: False)():
            raise PeerUnavailable("transformers' use_mambapy fallback needs mambapy (pip install mambapy)")
        model = transformers.MambaModel(hf_cfg)
    else:
        from transformers.models.mamba2 import modeling_mamba2 as modeling
        hf_cfg = transformers.Mamba2Config(**common, head_dim=HEADDIM, num_heads=EXPAND * cfg.d_model // HEADDIM,
                                           n_groups=1)
        model = transformers.Mamba2Model(hf_cfg)
    model = model.to(dev).train()
    paths = _hf_paths(modeling)

    def forward():
        return model(inputs_embeds=x, use_cache=False).last_hidden_state

    def finish() -> dict:
        logging.getLogger("transformers").removeHandler(handler)
        fallbacks = sorted({m.split("`")[1] for m in messages if "falling back" in m.lower() and "`" in m})
        kernels = sorted(k for k, v in paths.items() if v == "kernel")
        if impl == "hf-mamba2":
            scan = f"chunked SSD, chunk_size {hf_cfg.chunk_size}"
        else:
            pscan = hf_cfg.use_mambapy and getattr(modeling, "is_mambapy_available", lambda: False)()
            scan = "mambapy parallel scan" if pscan else "sequential loop"
        info = {"path": ("kernel: " + ", ".join(kernels)) if kernels else ("torch" if paths else "unknown"),
                "scan": scan, "path_detail": paths, "fallback_warnings": fallbacks,
                "hf_config": {k: getattr(hf_cfg, k, None) for k in (
                    "hidden_size", "num_hidden_layers", "state_size", "expand", "head_dim", "num_heads",
                    "n_groups", "chunk_size", "use_mambapy", "time_step_rank")
                    if getattr(hf_cfg, k, None) is not None}}
        return info

    return model, forward, finish


def _ssd_inputs(cfg: PeersConfig, B: int, L: int, dev, requires_grad=True):
    H = EXPAND * cfg.d_model // HEADDIM
    x = torch.randn(B, L, H, HEADDIM, device=dev)
    dt = torch.nn.functional.softplus(torch.randn(B, L, H, device=dev) - 4)
    A = -torch.exp(torch.rand(H, device=dev))
    Bm = torch.randn(B, L, 1, D_STATE, device=dev)
    Cm = torch.randn(B, L, 1, D_STATE, device=dev)
    return [t.requires_grad_(requires_grad) for t in (x, dt, A, Bm, Cm)]


def _ssd_ref(fn, chunk: int):
    """ssd_minimal_discrete on (x, dt, A, B, C) with our conventions: discretised inside (x*dt, A*dt), groups
    broadcast to heads, the sequence zero-padded to a chunk multiple (dt = 0 there: exact)."""
    import torch.nn.functional as F

    def run(x, dt, A, Bm, Cm):
        b, L, h, _ = x.shape
        pad = (-L) % chunk
        X, Adt = x * dt[..., None], A * dt
        Bh, Ch = Bm.expand(b, L, h, Bm.shape[-1]), Cm.expand(b, L, h, Cm.shape[-1])
        if pad:
            X, Bh, Ch = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (X, Bh, Ch))
            Adt = F.pad(Adt, (0, 0, 0, pad))
        y, _ = fn(X, Adt, Bh, Ch, chunk)
        return y[:, :L]
    return run


def _build(impl: str, cfg: PeersConfig, B: int, L: int, dev):
    """(module or None, the inputs needing grads, forward() -> output, finish() -> info dict)."""
    from wmbench.core.registry import create_backbone
    no_info = dict
    if impl in peers_linear.IMPLS or impl in peers_linear.OURS:
        return peers_linear.build(impl, cfg, B, L, dev)
    if impl in ("ours:mamba", "ours:mamba2"):
        model = create_backbone(impl.split(":")[1], cfg.d_model, cfg.n_layers).to(dev)
        x = torch.randn(B, L, cfg.d_model, device=dev)
        return model, [], lambda: model(x), no_info
    if impl == "mambapy":
        try:
            from mambapy.mamba import Mamba, MambaConfig
        except Exception as e:  # noqa: BLE001 - any import failure means: not usable here
            raise PeerUnavailable(f"import mambapy failed ({type(e).__name__}: {_first_line(e)})") from None
        model = Mamba(MambaConfig(d_model=cfg.d_model, n_layers=cfg.n_layers, d_state=D_STATE,
                                  expand_factor=EXPAND)).to(dev)
        x = torch.randn(B, L, cfg.d_model, device=dev)
        return model, [], lambda: model(x), \
            lambda: {"scan": "parallel scan (pscan)" if model.config.pscan else "sequential loop"}
    if impl in ("hf-mamba", "hf-mamba-seq", "hf-mamba2"):
        x = torch.randn(B, L, cfg.d_model, device=dev)
        try:
            model, forward, finish = _build_hf(impl, cfg, dev, x)
        except ImportError as e:
            raise PeerUnavailable(f"import transformers failed ({type(e).__name__}: {_first_line(e)})") from None
        return model, [], forward, finish
    if impl in ("ours:ssd", "ssd-minimal"):
        inputs = _ssd_inputs(cfg, B, L, dev)
        if impl == "ours:ssd":
            from wmbench.backbones.ops.ssd import ssd_scan

            def forward():
                return ssd_scan(*inputs, cfg.ssd_chunk, kernel="torch")[0]
            return None, inputs, forward, no_info
        ref = _ssd_ref(load_ssd_minimal(), cfg.ssd_chunk)
        return None, inputs, lambda: ref(*inputs), lambda: {"agreement": _ssd_agreement(ref, cfg, dev)}
    raise ValueError(f"unknown implementation {impl!r}")


def _ssd_agreement(ref, cfg: PeersConfig, dev) -> dict:
    """The same function of the same inputs: max |ours - peer| on a small input (fp32)."""
    from wmbench.backbones.ops.ssd import ssd_scan
    with torch.no_grad():
        ins = _ssd_inputs(cfg, 2, 3 * cfg.ssd_chunk + 5, dev, requires_grad=False)
        ours = ssd_scan(*ins, cfg.ssd_chunk, kernel="torch")[0]
        theirs = ref(*ins)
    return metric(float((ours - theirs).abs().max()), "abs", "max abs(ours - peer) on a (2, 3*chunk+5) input, fp32",
                  scale=float(ours.abs().max()))


def run_cell(cfg: PeersConfig, impl: str, B: int, L: int) -> dict:
    """Measure one implementation at one shape in this process; returns metrics, or
    {"not_installed": reason} when the peer cannot be imported here."""
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = torch.device(cfg.device)
    try:
        model, inputs, forward, finish = _build(impl, cfg, B, L, dev)
    except PeerUnavailable as e:
        return {"not_installed": str(e)}
    seen = {}

    def fwd_bwd():
        y = forward()
        if not seen:
            seen["shape"], seen["finite"] = list(y.shape), bool(torch.isfinite(y).all())
        y.float().square().mean().backward()
        if model is not None:
            model.zero_grad(set_to_none=True)
        for t in inputs:
            t.grad = None
        tick()

    with PeakMemory(dev) as mem:
        times = time_calls(fwd_bwd, warmup=cfg.warmup, iters=cfg.iters, device=dev)
    t = median(times)
    out = {
        "fwd_bwd_time": metric(1e3 * t, "ms", f"median of {cfg.iters} timed fwd+bwd calls after {cfg.warmup} "
                               "warm-up", samples_ms=[1e3 * s for s in times]),
        "tokens_per_s": metric(B * L / t, "tokens/s", "batch*length / median fwd+bwd time"),
        "peak_memory": metric(mem.peak_bytes, "bytes", mem.method),
        "output_shape": seen["shape"],
        "output_finite": seen["finite"],
        "threads": metric(torch.get_num_threads(), "threads", "torch.get_num_threads() in the cell"),
    }
    if model is not None:
        out["n_params"] = metric(sum(p.numel() for p in model.parameters()), "parameters")
    out.update(finish())
    return out


# --------------------------------------------------------------------------------------------------
# the run: every pair, ours and the peer, each cell in a fresh process
# --------------------------------------------------------------------------------------------------

def memory_need(impl: str, cfg: PeersConfig, B: int, L: int) -> int:
    if impl in peers_linear.IMPLS or impl in peers_linear.OURS:
        return peers_linear.memory_need(impl, cfg, B, L)
    layers = 1 if impl in ("ours:ssd", "ssd-minimal") else cfg.n_layers
    return int(B * L * layers * _bytes_per_token_layer(impl, cfg.d_model))


def memory_available(device: str) -> tuple[int, str]:
    if torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(torch.device(device))[0]), "GPU memory free"
    import psutil
    return int(psutil.virtual_memory().available), "RAM available"


def _cells(cfg: PeersConfig) -> list[tuple[str, str, int, int]]:
    """(pair, impl, B, L) in run order; our implementations are measured once per shape."""
    return [(pair, impl, cfg.shapes[pair]["batch"], L) for pair in cfg.pairs for L in cfg.shapes[pair]["lengths"]
            for impl in (PAIRS[pair].ours, PAIRS[pair].peer)]


def _ratios(ours: dict, peer: dict) -> None:
    if "fwd_bwd_time" not in ours or "fwd_bwd_time" not in peer:
        return
    peer["time_ratio_to_ours"] = metric(peer["fwd_bwd_time"]["value"] / ours["fwd_bwd_time"]["value"], "x",
                                        "peer median fwd+bwd time / ours (above 1: ours is faster)")
    if ours["peak_memory"]["value"] > 0:
        peer["memory_ratio_to_ours"] = metric(peer["peak_memory"]["value"] / ours["peak_memory"]["value"], "x",
                                              "peer peak memory / ours (above 1: ours uses less)")
    peer["output_shape_matches_ours"] = peer["output_shape"] == ours["output_shape"]


def run_peers(cfg: PeersConfig, runs_dir="results/runs", progress: bool = True) -> tuple[dict, str]:
    from tqdm import tqdm

    check_peers_config(cfg)
    peers = {}
    for pair in cfg.pairs:
        try:
            peers[pair] = {**probe_peer(pair), "status": "ok"}
        except PeerUnavailable as e:
            peers[pair] = {"name": PAIRS[pair].package, "status": "not installed", "reason": str(e)}
        except peers_linear.OursMissing as e:       # the peer is here, our side is not
            peers[pair] = {"name": PAIRS[pair].package, "status": "skipped", "reason": str(e)}
    # no peer: ours alone is still measured (its time beside our other backbones at the same shape)
    todo = [c for c in _cells(cfg) if peers[c[0]]["status"] == "ok" or
            (peers[c[0]]["status"] == "not installed" and c[1] == PAIRS[c[0]].ours)]
    keys = list(dict.fromkeys((impl, B, L) for _, impl, B, L in todo))   # ours once per shape
    per = cfg.warmup + cfg.iters
    bar = tqdm(total=len(keys) * per, desc="bench --peers", disable=not progress, unit="call",
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")
    done: dict = {}
    unusable: dict[str, str] = {}
    for i, (impl, B, L) in enumerate(keys):
        bar.set_postfix_str(f"{impl} B={B} L={L}")
        need = memory_need(impl, cfg, B, L)
        have, where = memory_available(cfg.device)
        if impl in unusable:          # its import already failed in an earlier cell
            done[impl, B, L] = {"not_installed": unusable[impl]}
        elif need > have:
            done[impl, B, L] = {"error": f"skipped: needs about {need / 2**30:.1f} GiB, more than the "
                                         f"{have / 2**30:.1f} GiB {where}"}
        else:
            done[impl, B, L] = run_cell_subprocess(
                "wmbench.harness.peers", {"cfg": asdict(cfg), "impl": impl, "B": B, "L": L,
                                          "malloc": allocator.active()}, on_tick=lambda: bar.update(1))
            done[impl, B, L]["memory_estimate"] = metric(need, "bytes", "the pre-run check's estimate")
            if "not_installed" in done[impl, B, L]:
                unusable[impl] = done[impl, B, L]["not_installed"]
        bar.n = (i + 1) * per
        bar.refresh()
    bar.close()

    out = {}
    for pair in cfg.pairs:
        p = PAIRS[pair]
        B = cfg.shapes[pair]["batch"]
        entry = {"what": p.what, "ours": p.ours, "peer": peers[pair], "batch": B, "lengths": {}}
        for L in cfg.shapes[pair]["lengths"] if peers[pair]["status"] in ("ok", "not installed") else []:
            ours = dict(done[p.ours, B, L])
            if peers[pair]["status"] != "ok":
                entry["lengths"][str(L)] = {"ours": ours}
                continue
            peer = dict(done[p.peer, B, L])
            if "not_installed" in peer:   # found, but its import failed in the cell
                entry["peer"] = {"name": p.package, "status": "not installed", "reason": peer["not_installed"]}
                entry["lengths"][str(L)] = {"ours": ours}
                continue
            _ratios(ours, peer)
            entry["lengths"][str(L)] = {"ours": ours, "peer": peer}
        out[pair] = entry
    metrics = {"pairs": out}
    return save_cells_record("peer-bench", asdict(cfg), metrics, cfg.device, cfg.threads, runs_dir, "peer-bench")


def _cell_main(payload: str) -> None:
    d = json.loads(payload)
    allocator.configure(d["malloc"])
    print(json.dumps(run_cell(PeersConfig(**d["cfg"]), d["impl"], d["B"], d["L"])))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--cell", required=True)
    _cell_main(ap.parse_args().cell)
