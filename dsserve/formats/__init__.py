"""Checkpoint formats other engines publish (pre-quantized weights): detection and conversion to dsserve's forms."""
