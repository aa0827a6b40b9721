"""Owns the device: the model, the KV cache tensors, batch construction and sampling for one step."""
