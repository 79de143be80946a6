"""The training loop, run wiring, checkpoints, logs and plots.

`zotune.train` is also the public function `zotune.train(config, **overrides)` (zotune/api.py):
importing this package sets the attribute `train` of the `zotune` package to this module, so the
module itself is made callable rather than shadowing the function.
"""

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, config=None, **kwargs):
        """zotune.train(config, resume=False, **overrides) -> the run summary (zotune.api.train)."""
        from zotune.api import train

        return train(config, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
