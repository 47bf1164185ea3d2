"""Triton kernels, installed as `adaface.kernels` (one module per op).

Each module holds the kernels (with the forward and backward formulas in its docstring), thin launchers
that flatten inputs and pick tiles, and the `torch.library` custom ops whose autograd formula calls the
backward launcher. `_runtime` holds what they share (the cosine eps, whether Triton is interpreted, how
launchers choose tiles and how tests swap that choice). Import them through `adaface.ops`, which validates
input and dispatches.
"""
