"""One benchmark configuration in its own process, stepped by a driver (benchmarks/lockstep.py).

    python benchmarks/worker.py '{"mode": "prge", "q": 4, "b": 4, "T": 64, "dual": true}'

Modes: forward (plain inference over `rows` rows, no adapter), prge, rge, fo (the eager trainer's
engine, as `zotune train` builds it), pte (an exported ExecuTorch program's train_step), ort (an
exported ONNX program's step in ONNX Runtime, spec "onnx": its path).
"device": "cuda" runs on a GPU (synchronised before each step's time is taken); "random_init"
builds the model from the config in the folder "model" names, with random weights, for machines
the checkpoint cannot reach (step time does not depend on the weights' values).
The batch is synthetic: b rows of T real-vocabulary tokens with no padding, so every
configuration pays for exactly T positions (demo batches are trimmed to their longest prompt).

Protocol (stdin/stdout lines, prefixed '@@' so library prints cannot be mistaken for it):
the worker loads, runs `warmup` steps, says '@@ready {json}', then answers each 'step' with
'@@<seconds>' and 'quit' with '@@done {json}' (peak RSS and the import baseline).
"""

from __future__ import annotations

import importlib
import json
import resource
import sys
import time


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _batch(rows: int, T: int, vocab: int, choice: list[int], device="cpu"):
    import torch

    g = torch.Generator().manual_seed(rows * 1000 + T)
    ids = torch.randint(100, vocab, (rows, T), generator=g, dtype=torch.int64)
    am = torch.ones(rows, T, dtype=torch.int64)
    pos = torch.arange(T, dtype=torch.int64).expand(rows, T).contiguous()
    choices = torch.tensor([choice] * rows, dtype=torch.int64)
    labels = torch.arange(rows, dtype=torch.int64) % len(choice)
    return tuple(t.to(device) for t in (ids, am, pos, choices, labels))


def build(spec: dict):
    """-> a function step(i) that runs one step of the configuration."""
    import torch

    from zotune.config import Config
    from zotune.models import load_model
    from zotune.models.loader import load_tokenizer

    mode, q, b, T = spec["mode"], spec.get("q", 4), spec.get("b", 4), spec.get("T", 64)
    model_name = spec.get("model", "smollm2-135m")
    device = torch.device(spec.get("device", "cpu"))
    if spec.get("random_init"):  # a config folder without weights (timing only)
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_name)
    else:
        tokenizer = load_tokenizer(model_name)
    choice = [tokenizer.encode(w, add_special_tokens=False)[0] for w in (" positive", " negative")]
    if mode in ("pte", "ort"):  # an exported program: ExecuTorch .pte or ONNX
        from zotune.engines.program import runtime

        program_cls, set_threads = runtime("executorch" if mode == "pte" else "onnx")
        if spec.get("threads"):  # the runtime's own threads (default: one per core)
            set_threads(spec["threads"])
        prog = program_cls.load(spec["pte" if mode == "pte" else "onnx"])
        batch = _batch(b, T, len(tokenizer), choice)
        return lambda i: prog.train_step(1000 + i, 3e-3, 1e-2, batch)

    if spec.get("random_init"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(model_name), attn_implementation="sdpa"
        ).eval()
    else:
        model, _, _ = load_model(model_name)
    model.to(device)
    vocab = model.get_output_embeddings().weight.shape[0]
    if mode == "forward":
        from zotune.loss import ClassificationLoss

        loss = ClassificationLoss()
        batch = _batch(spec["rows"], T, vocab, choice, device)

        @torch.no_grad()
        def forward(i):
            out = loss.logits(model, *batch[:4])
            if device.type == "cuda":
                torch.cuda.synchronize()  # the step ends when the device is done
            return out

        return forward

    from zotune.engines.eager import EagerEngine

    cfg = Config()
    cfg.optim.estimator, cfg.optim.q, cfg.optim.batch_size = mode, q, b
    cfg.optim.dual = spec.get("dual", True)
    if mode == "fo":
        cfg.optim.lr, cfg.optim.optimizer = 1e-3, "adamw"
    engine = EagerEngine(model, cfg, "classification")
    batch = _batch(b, T, vocab, choice, device)

    def step(i):
        out = engine.step(batch, 1000 + i, cfg.optim.lr, cfg.optim.eps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    return step


def main() -> None:
    spec = json.loads(sys.argv[1])
    import torch

    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    importlib.import_module("zotune.engines.eager")
    from zotune.runtime import keep_heap

    keep_heap()  # as the zotune command does, for every mode alike  # the import baseline includes zotune
    import_rss = peak_rss_mb()
    t0 = time.perf_counter()
    step = build(spec)
    load_s = time.perf_counter() - t0
    for i in range(spec.get("warmup", 1)):
        step(-1 - i)
    say = lambda s: print(f"@@{s}", flush=True)  # noqa: E731
    say("ready " + json.dumps({"load_s": load_s}))
    i = 0
    for line in sys.stdin:
        if line.strip() == "step":
            t = time.perf_counter()
            step(i)
            say(f"{time.perf_counter() - t:.6f}")
            i += 1
        elif line.strip() == "quit":
            break
    info = {"peak_rss_mb": peak_rss_mb(), "import_rss_mb": import_rss, "threads": torch.get_num_threads()}
    if spec.get("device", "cpu").startswith("cuda"):
        info["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        info["gpu"] = torch.cuda.get_device_name()
    say("done " + json.dumps(info))


if __name__ == "__main__":
    main()
