"""Leaf layer: kernel launchers (Triton, the C++/CUDA extension) and backend availability."""
