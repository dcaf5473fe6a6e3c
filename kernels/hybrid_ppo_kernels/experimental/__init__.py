"""Kernels the training loop does not run: kept to be measured against the shipped ones on a GPU
(scripts/bench_kernels.py), not imported by hybrid_ppo."""
