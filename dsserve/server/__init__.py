"""The OpenAI-compatible HTTP server: app factory, schemas, one module per endpoint, metrics."""
