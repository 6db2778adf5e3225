"""Drift node agent: a paged-KV LLM engine with prefill/decode multiplexing, served over an OpenAI API."""

__version__ = "0.1.0"
