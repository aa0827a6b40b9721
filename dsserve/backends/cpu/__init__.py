"""dsserve's CPU backend: packed weights, the C kernels (csrc/, one header), their build and dispatch."""
