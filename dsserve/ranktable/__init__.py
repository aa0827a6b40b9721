"""MindIE rank tables: generate, validate (every error with its location), and the torch.distributed environment."""
