"""Local compute kernels. Each op has a pure-PyTorch reference beside its fused backends."""
