"""Process-level settings that make CPU training steps faster.

glibc hands every block above a moving threshold (128 KB at start) back to the kernel when it is
freed and trims the top of the heap, so a forward pass that allocates the same activation-sized
blocks every layer pays page faults on fresh pages each time. Measured on SmolLM2-135M (2 threads,
q=4 b=4 T=64): a plain forward 8 % faster and the P-RGE step 8-10 % faster with the heap kept
(benchmarks/results/cost.md runs every configuration, the forward baseline included, this way).
zotune's commands call `keep_heap()` once at start; ZOTUNE_MALLOC=system leaves glibc as it is.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling: larger blocks are still mapped and unmapped
TRIM_THRESHOLD = 1 << 30


def keep_heap() -> bool:
    """Serve blocks up to 32 MB from a heap that is not trimmed. -> whether it took effect (False
    without glibc, e.g. on macOS or Android, where the system allocator already caches)."""
    if os.environ.get("ZOTUNE_MALLOC", "").lower() == "system":
        return False
    # The process's own symbols: no library search (find_library would run ldconfig at start-up).
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
