"""Triton kernels of lps_fast (installed as ``lps_fast.kernels``).

``OPS`` maps each public op name to its registered ``lps_fast::<op>_triton`` op.
"""

OPS = {}
