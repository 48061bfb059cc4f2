"""Triton kernels and their launchers. Kernels take plain tensors; they know nothing of modules or formats objects."""
