"""Reasoning output: split a model's text into (reasoning_content, content); no HTTP types here."""
