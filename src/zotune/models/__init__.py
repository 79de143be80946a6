"""Model loading (embedded, folder, GGUF, hub) and tiny test models."""

import transformers as _transformers

from zotune.models.loader import EMBEDDED, load_model, load_tokenizer, resolve

_transformers.utils.logging.set_verbosity_error()
_transformers.utils.logging.disable_progress_bar()

__all__ = ["EMBEDDED", "load_model", "load_tokenizer", "resolve"]
