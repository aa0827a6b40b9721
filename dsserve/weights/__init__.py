"""Operator tools for checkpoint folders: verify them, convert FP8 block-quantized weights to BF16."""
