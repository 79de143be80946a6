"""Model loading (embedded, folder, GGUF, hub) and tiny test models."""

import logging as _logging

import transformers as _transformers

from zotune.models.loader import EMBEDDED, load_model, load_tokenizer, resolve

_transformers.utils.logging.set_verbosity_error()
_transformers.utils.logging.disable_progress_bar()
# from_pretrained imports torchao (through transformers' quantizers), which logs that its CUDA
# kernels are missing on this CPU build; nothing zotune uses needs them.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)

__all__ = ["EMBEDDED", "load_model", "load_tokenizer", "resolve"]
