"""Requests, scheduling, KV block bookkeeping, tokenization and the engine loop; plain Python over CPU tensors."""
