"""The dpo_kernels test suite; its folders mirror the package (dpo_kernels/)."""
