"""zotune: forward-only (zeroth-order) fine-tuning of LLMs inside inference engines."""

__version__ = "0.1.0"
