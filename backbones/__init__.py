"""Sequence-model backbones, one file each; importing this package registers the built-ins."""
from wmbench.backbones import gru, mamba, mamba2, transformer  # noqa: F401  (registration side effects)
