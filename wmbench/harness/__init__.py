"""Benchmark harnesses: the backbone bench (`wmbench bench`) and grid-world runs (`wmbench run`)."""
