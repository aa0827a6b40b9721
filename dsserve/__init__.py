"""dsserve: serve DeepSeek R1 / V3 / V2 and the R1-Distill models; the offline API is `LLM` and `SamplingParams`."""

from dsserve.engine.request import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "LLM":  # imported lazily: `import dsserve` stays cheap for the CLI's tools
        from dsserve.llm import LLM

        return LLM
    raise AttributeError(f"module 'dsserve' has no attribute {name!r}")
