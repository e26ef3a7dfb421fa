"""Fast paths of the HA-DW loss.

`hadw_kernels.ops.triton_loss` holds the fused Triton kernel (launcher + torch custom op); it imports triton and is
loaded only on the Triton path (`hadw_loss(..., backend="triton")`, or "auto" on CUDA). Nothing here imports triton,
so `import hadw_kernels` works without it.
"""
