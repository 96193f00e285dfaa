"""Triton kernels of audioenc, installed as ``audioenc.kernels``.

One file per kernel (kernel -> launcher -> *_ref). Nothing here imports triton or runs at import time.
"""
