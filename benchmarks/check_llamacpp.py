"""Check (not part of make test: llama-cpp-python builds llama.cpp from source): the GGUF adapter
that `zotune export-adapter --format gguf` writes, loaded by llama.cpp on the base GGUF, moves the
next-token logits as zotune's eager model with the same adapter does.

    pip install --target DIR --no-deps llama-cpp-python==0.3.36 diskcache   # builds llama.cpp
    PYTHONPATH=DIR python benchmarks/check_llamacpp.py RUN/adapter [--min-corr 0.9]

(On a virtual machine whose CPU flags promise more than it runs, build with
CMAKE_ARGS="-DGGML_NATIVE=OFF": a native build can crash in its first decode.)

The base is the embedded SmolLM2-135M GGUF (Q4_1), which is also zotune's embedded model (its
dequantized weights). llama.cpp's Q4_1 kernels quantize the activations to 8 bits, so the base
logits of the two already differ (printed); the check compares the adapter's effect,
logits(base + adapter) - logits(base), over every position and token: its correlation, its
relative L2 difference and the ratio of its mean magnitudes, and the top-1 token with the
adapter. Exit status 0 when the correlation is at least --min-corr, the magnitudes agree within
--max-ratio-error and every top-1 token agrees: a wrong tensor name, transposition, q/k row order
or alpha shows as an uncorrelated or rescaled effect.
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
    p.add_argument("--min-corr", type=float, default=0.9)
    p.add_argument("--max-ratio-error", type=float, default=0.1)
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
    effect_zotune, effect_cpp = tuned - base, cpp_tuned - cpp_base  # [T, V]
    corr = float(np.corrcoef(effect_zotune.ravel(), effect_cpp.ravel())[0, 1])
    rel = float(np.linalg.norm(effect_zotune - effect_cpp) / np.linalg.norm(effect_zotune))
    ratio = float(np.abs(effect_cpp).mean() / np.abs(effect_zotune).mean())
    top1 = bool((tuned.argmax(-1) == cpp_tuned.argmax(-1)).all())
    print(
        f"base logits, llama.cpp against zotune: max |d| {np.abs(cpp_base - base).max():.3f}, "
        f"mean {np.abs(cpp_base - base).mean():.3f}\n"
        f"adapter effect: mean |d| zotune {np.abs(effect_zotune).mean():.4f}, llama.cpp "
        f"{np.abs(effect_cpp).mean():.4f} (ratio {ratio:.3f}); correlation {corr:.3f}; relative "
        f"L2 difference {rel:.3f}; top-1 agrees at all {len(ids)} positions: {top1}"
    )
    ok = corr >= args.min_corr and abs(ratio - 1) <= args.max_ratio_error and top1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
