"""Fast paths of the HA-DW loss.

Triton (each a public launcher module + a private `_*_kernels` module of @triton.jit code; loaded only on the Triton
path, `backend="triton"` or "auto" on CUDA): `triton_loss` (the fused `hadw_loss` and `hadw_policy_loss`, custom ops
`hadw_kernels::fused_loss`, `::policy_loss`, `::loss_backward`), `triton_advantages` (`hadw_advantages`, custom op
`hadw_kernels::group_advantages`); `_triton_runtime` holds what the launchers share (interpreter detection, the
triton 3.6 interpreter fix, output allocation) and `_config_json` the config as a custom-op argument. Nothing here
imports triton, so `import hadw_kernels` works without it.

Native CPU (`backend="native"` or "auto" on CPU): `cpu_loss` loads the C++ core built from `hadw_kernels/csrc`
(`hadw_kernels/_hadw_cpu*.so`, ctypes) and defines the custom ops `hadw_kernels::native_loss`, `::native_policy_loss`,
`::native_loss_backward`; it is imported on first use.
"""
