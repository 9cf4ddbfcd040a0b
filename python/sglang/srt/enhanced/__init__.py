"""sglang-enhanced: mixed-precision weight loading and expert activation tracking for SGLang.

Nothing here imports SGLang's runtime at import time; kernels, decoders and the
tracker core need only torch (and triton for the GPU kernels).
"""
