"""Check (not part of make test): can the installed executorch + torchao lower a weight-only 4-bit
base (int4 grouped weights, float activations) for the P-RGE step, with numbers that match eager?

    .venv/bin/python benchmarks/check_et_weight_only.py [--group-size 32] [--family llama]

A tiny model (the test suite's) is quantized with torchao's IntxWeightOnlyConfig on the base
linears the 8da4w recipe quantizes, then exported twice by the ExecuTorch exporter: through
XNNPACK and with portable kernels only. The exporter's parity gate compares the lowered program
with eager PyTorch on the same quantized model (forward logits, loss, 2 eps g, theta, update)
and refuses a program that differs. Prints the gate's numbers or the lowering error of each.
Exit status 0 when a program passes the gate (the recipe could then be offered).
"""

import argparse
import sys
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from zotune.config import Config  # noqa: E402
from zotune.engines import et_lowering, executorch  # noqa: E402
from zotune.engines.eager import build_params  # noqa: E402
from zotune.engines.export_common import StepSpec  # noqa: E402
from zotune.loss import ClassificationLoss  # noqa: E402
from zotune.models.loader import load_tokenizer  # noqa: E402
from zotune.models.tiny import make_tiny_model  # noqa: E402


def weight_only_int4(model, adapter, group_size: int) -> list[str]:
    """The 8da4w recipe's choice of layers, quantized weight-only (float activations)."""
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    chosen = et_lowering.base_linears(model, group_size)
    config = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))
    quantize_(model, config, filter_fn=lambda module, fqn: fqn in chosen)
    et_lowering.bf16_scales(model, chosen)  # as XNNPACK stores them, like 8da4w
    return chosen


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--family", default="llama")
    args = p.parse_args()
    # The exporter's quantization stage, given the weight-only recipe instead of 8da4w.
    executorch.quantize_8da4w = weight_only_int4
    tokenizer = load_tokenizer("smollm2-135m")
    cfg = Config()
    cfg.adapter.rank, cfg.adapter.alpha = 4, 8
    passed = False
    for xnnpack in (True, False):
        model = make_tiny_model(args.family, tokenizer, seed=0)
        adapter = build_params(model, cfg)
        what = "XNNPACK" if xnnpack else "portable kernels"
        with TemporaryDirectory() as tmp:
            try:
                spec = StepSpec(2, 2, 12, 2, eval_batch=2, quantize="8da4w")
                out = Path(tmp) / "w4.pte"
                options = dict(xnnpack=xnnpack, group_size=args.group_size)
                report = executorch.export_program(model, adapter, ClassificationLoss(), spec, out, **options)
                print(f"{what}: passes the parity gate: {report.check}")
                passed = True
            except Exception as e:  # the finding is the error itself
                print(f"{what}: {type(e).__name__}: {str(e).splitlines()[0][:400]}")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
