"""Check (not part of make test: llama-cpp-python builds llama.cpp from source): the GGUF adapter
that `zotune export-adapter --format gguf` writes, loaded by llama.cpp on the base GGUF, moves the
next-token logits as zotune's eager model with the same adapter does.

    pip install -c constraints.txt llama-cpp-python==<version>   # builds llama.cpp (minutes)
    python benchmarks/check_llamacpp.py RUN/adapter [--tol 0.05]

The base is the embedded SmolLM2-135M GGUF (Q4_1). llama.cpp computes with the quantized weights and
zotune with their dequantised values, so the logits themselves differ by the kernels' rounding; the
check compares the adapter's effect, logits(base + adapter) - logits(base), per position, and the
top-1 token with the adapter. Exit status 0 when the largest difference of effects is within --tol
and every top-1 token agrees.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from zotune.adapters.gguf_io import export_gguf  # noqa: E402
from zotune.adapters.lora import LoRAAdapter  # noqa: E402
from zotune.adapters.peft_io import load_peft  # noqa: E402
from zotune.models import load_model  # noqa: E402
from zotune.models.loader import _embedded_gguf  # noqa: E402

TEXT = "Review: a warm, funny and beautifully made film.\nSentiment (positive or negative):"


def llama_logits(gguf_path: str, ids: list[int], lora: str | None) -> np.ndarray:
    from llama_cpp import Llama

    kwargs = {"lora_path": lora} if lora else {}
    llm = Llama(model_path=gguf_path, logits_all=True, n_ctx=256, n_threads=2, verbose=False, **kwargs)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)  # [T, V]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("adapter")
    p.add_argument("--tol", type=float, default=0.05)
    args = p.parse_args()
    config, state = load_peft(args.adapter)
    model, tokenizer, _ = load_model("smollm2-135m")
    ids = tokenizer(TEXT)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        base = model(input_ids=x).logits[0].double().numpy()
        adapter = LoRAAdapter(
            model, rank=config["r"], alpha=config["lora_alpha"], targets=config["target_modules"]
        )
        adapter.load_state(state)
        tuned = model(input_ids=x).logits[0].double().numpy()
    gguf_base = str(_embedded_gguf("smollm2-135m"))
    with tempfile.TemporaryDirectory() as tmp:
        lora = str(export_gguf(args.adapter, Path(tmp) / "adapter.gguf", "smollm2-135m"))
        cpp_base = llama_logits(gguf_base, ids, None)
        cpp_tuned = llama_logits(gguf_base, ids, lora)
    effect_zotune, effect_cpp = tuned - base, cpp_tuned - cpp_base
    diff = float(np.abs(effect_zotune - effect_cpp).max())
    top1 = bool((tuned.argmax(-1) == cpp_tuned.argmax(-1)).all())
    print(
        f"adapter effect on the logits: zotune max |d| {np.abs(effect_zotune).max():.4f}, "
        f"llama.cpp {np.abs(effect_cpp).max():.4f}; max difference {diff:.4f} (tol {args.tol}); "
        f"top-1 agrees at every position: {top1}"
    )
    return 0 if diff <= args.tol and top1 else 1


if __name__ == "__main__":
    sys.exit(main())
