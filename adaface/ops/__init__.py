"""Public ops: validate input, then dispatch to the PyTorch reference, Triton or the C++/CUDA extension.

`backend="auto"` runs Triton on CUDA tensors; on CPU tensors the C++ extension for the two losses when it is
built, else the PyTorch reference; "torch", "triton", "cuda" (CUDA tensors) and "cpp" (CPU tensors) force one.
Under TRITON_INTERPRET=1, "triton" runs the real kernels on CPU tensors through Triton's interpreter. Each op's
plain PyTorch reference sits beside it.
"""

from .attention import expanded_attention, expanded_attention_reference
from .delta_cosine import delta_cosine_loss, delta_cosine_loss_reference
from .ortho import ortho_subtract, ortho_subtract_reference
from .soft_warp import soft_warp_loss, soft_warp_loss_reference

__all__ = [
    "delta_cosine_loss",
    "delta_cosine_loss_reference",
    "expanded_attention",
    "expanded_attention_reference",
    "ortho_subtract",
    "ortho_subtract_reference",
    "soft_warp_loss",
    "soft_warp_loss_reference",
]
