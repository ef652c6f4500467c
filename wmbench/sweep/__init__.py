"""Sweeps: grids of `wmbench run` / `wmbench atari` runs on an executor (local processes, SLURM, Ray)."""
