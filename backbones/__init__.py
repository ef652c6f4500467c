"""Sequence-model backbones, one file each; importing this package registers the built-ins."""
from wmbench.backbones import (gated_deltanet, gru, mamba, mamba2, mamba3, mlstm,  # noqa: F401  (registration
                               rwkv7, transformer)                                  # side effects)
