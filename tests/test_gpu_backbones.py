"""On a GPU, every backbone's `kernel="auto"` path (the `cuda` extra's kernels where they import) against its
own PyTorch path on the same weights, forward and gradients; and the contract (step == forward) on CUDA.
Run by tests/gpu/run.sh; skipped on a CPU, where the script itself must skip with one line."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

import wmbench

NAMES = wmbench.list_backbones()
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _set_kernel(model: torch.nn.Module, kernel: str) -> None:
    for m in model.modules():
        if hasattr(m, "kernel") and isinstance(m.kernel, str):
            m.kernel = kernel


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("name", NAMES)
def test_cuda_kernels_match_the_pytorch_path(name):
    torch.manual_seed(0)
    bb = wmbench.create_backbone(name, 256, 2).cuda().eval()
    x = torch.randn(4, 300, 256, device="cuda", requires_grad=True)
    outs = {}
    for kernel in ("auto", "torch"):
        _set_kernel(bb, kernel)
        x.grad = None
        bb.zero_grad()
        y = bb(x)
        (y * torch.linspace(-1, 1, 256, device="cuda")).sum().backward()
        outs[kernel] = (y.detach(), x.grad.clone(), [p.grad.clone() for p in bb.parameters()])
    (ya, gxa, gpa), (yt, gxt, gpt) = outs["auto"], outs["torch"]
    torch.testing.assert_close(ya, yt, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(gxa, gxt, rtol=5e-3, atol=5e-3)
    for a, t in zip(gpa, gpt):
        torch.testing.assert_close(a, t, rtol=1e-2, atol=1e-2)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("name", NAMES)
def test_contract_on_cuda(name, backbone_contract):
    torch.manual_seed(0)
    bb = wmbench.create_backbone(name, 64, 2).cuda().eval()
    x = torch.randn(2, 37, 64, device="cuda")
    backbone_contract(bb, x, 11, 23)


def test_gpu_script_skips_cleanly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the script for real")
    script = Path(__file__).parent / "gpu" / "run.sh"
    p = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stderr == ""
    assert p.stdout.count("\n") == 1 and p.stdout.startswith("gpu check skipped: ")
