"""Model definitions (one file per architecture), the model_type registry, and the checkpoint loader."""
