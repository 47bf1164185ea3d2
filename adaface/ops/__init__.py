"""Public ops: validate input, then dispatch to the PyTorch reference, Triton or the C++/CUDA extension.

`backend="auto"` runs Triton on CUDA tensors and the PyTorch reference on CPU tensors; "torch", "triton",
"cuda" (CUDA tensors) and "cpp" (CPU tensors) force one. Under TRITON_INTERPRET=1, "triton" runs the real
kernels on CPU tensors through Triton's interpreter.
"""

from .ortho import ortho_subtract, ortho_subtract_reference

__all__ = ["ortho_subtract", "ortho_subtract_reference"]
