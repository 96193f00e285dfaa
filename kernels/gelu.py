"""The exact (erf) GELU every family uses, as a Triton device function for kernel epilogues."""
import triton
import triton.language as tl


@triton.jit
def gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
