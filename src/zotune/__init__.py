"""zotune: forward-only (zeroth-order) fine-tuning of LLMs inside inference engines.

The public Python surface (see docs/tasks.md for examples):

    zotune.load_config(path_or_dict_or_Config=None, **overrides) -> Config
    zotune.train(config, **overrides) -> run summary         # what `zotune train` does
    zotune.evaluate(config, adapter=None, split="test", **overrides) -> metrics
    zotune.PRGE(model, loss_fn, q=4, eps=1e-2, lr=1e-4, ...)  # one P-RGE step in your own loop:
        loss, g = est.step(batch)                            #   or est.accumulate(micro) ... est.apply()
    zotune.LoRAAdapter(model, rank=16, alpha=32)             # zotune's LoRA / LoRA-FA layers
    zotune.ZotuneError                                       # every user-input error

Overrides are `section.key` or `section__key` keywords (`optim__lr=1e-3`) or section dicts
(`optim={"lr": 1e-3}`). Imports are lazy: `import zotune` does not import torch.
"""

__version__ = "0.1.0"

__all__ = ["LoRAAdapter", "PRGE", "ZotuneError", "evaluate", "load_config", "train"]


def __getattr__(name):
    if name == "train":  # the subpackage zotune.train, which is callable as the function
        import importlib

        return importlib.import_module("zotune.train")
    if name in ("PRGE", "evaluate", "load_config"):
        from zotune import api

        return getattr(api, name)
    if name == "LoRAAdapter":
        from zotune.adapters.lora import LoRAAdapter

        return LoRAAdapter
    if name == "ZotuneError":
        from zotune.errors import ZotuneError

        return ZotuneError
    raise AttributeError(f"module 'zotune' has no attribute '{name}'")
