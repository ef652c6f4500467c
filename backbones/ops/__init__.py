"""Numerical kernels of the backbones: pure-PyTorch references and lazy CUDA dispatch."""
