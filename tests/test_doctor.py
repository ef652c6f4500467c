"""`wmbench doctor` on a CPU: one line per fact, every optional kernel named with its state, and the
automatic precision measured once, then read from the choice cache."""
import types

from wmbench.cli import main
from wmbench.harness import doctor


def test_doctor_on_a_cpu(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out.splitlines()
    heads = [line.split(":")[0] for line in out[1:]]
    assert out[0].startswith("wmbench ") and "torch " in out[0]
    for head in ("cpu", "cuda", "threads", "allocator", "precision", "choices"):
        assert head in heads, out
    kernels = [line for line in out if line.startswith("kernel:")]
    assert [k.split()[1] for k in kernels] == [name for name, _ in doctor.KERNELS]
    precision = next(line for line in out if line.startswith("precision:"))
    assert "--precision auto -> " in precision and "cached" not in precision      # measured now
    assert main(["doctor"]) == 0
    again = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("precision:"))
    assert "cached" in again or "no native bf16" in again                            # not measured twice


def test_kernel_states(monkeypatch):
    assert doctor.kernel_status("a_package_that_is_not_there", cuda=False).startswith("not installed")
    broken = types.SimpleNamespace()
    monkeypatch.setattr(doctor.importlib.util, "find_spec", lambda name: broken)

    def fail(name):
        raise OSError("libcudart.so.12: cannot open shared object file\nmore")
    monkeypatch.setattr(doctor.importlib, "import_module", fail)
    state = doctor.kernel_status("mamba_ssm", cuda=True)
    assert state == "installed, fails to import (libcudart.so.12: cannot open shared object file); " \
                    "the PyTorch path is used"
    monkeypatch.setattr(doctor.importlib, "import_module", lambda name: None)
    assert doctor.kernel_status("mamba_ssm", cuda=False) == "installed, imports; unused here (no CUDA)"
    assert doctor.kernel_status("mamba_ssm", cuda=True) == "installed, imports; used for CUDA tensors"
