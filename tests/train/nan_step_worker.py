"""Started by tests/train/test_distributed.py under torchrun (2 ranks): one P-RGE step in which
rank 1's model gives NaN losses, in data and in query mode. Each rank writes rank<r>.json: the
error it raised and whether its adapter is unchanged, per mode."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers

from helpers import synthetic_batch  # noqa: E402
from zotune.adapters.lora import LoRAAdapter  # noqa: E402
from zotune.config import Config  # noqa: E402
from zotune.errors import ZotuneError  # noqa: E402
from zotune.estimators.prge import PRGEStep  # noqa: E402
from zotune.loss import ClassificationLoss  # noqa: E402
from zotune.models import load_model  # noqa: E402
from zotune.train.distributed import Ranks  # noqa: E402

torch.set_num_threads(1)
folder, out = sys.argv[1], Path(sys.argv[2])
cfg = Config()
cfg.train.parallel, cfg.optim.q, cfg.optim.batch_size = "data", 2, 2
ranks = Ranks(cfg)
model, _, _ = load_model(folder)
adapter = LoRAAdapter(model, rank=4, alpha=8)
if ranks.rank == 1:
    with torch.no_grad():
        model.get_input_embeddings().weight.fill_(float("nan"))
results = {}
for mode in ("data", "query"):  # one job for both: the mode only picks the step's split
    ranks.mode = mode
    step = PRGEStep(model, adapter, ClassificationLoss(), q=2, **ranks.step_options())
    before = adapter.state()
    try:
        step(torch.tensor([7]), 1e-2, 1e-2, *ranks.shard(synthetic_batch(b=2)))
        error = None
    except ZotuneError as e:
        error = str(e)
    after = adapter.state()
    results[mode] = {"error": error, "unchanged": all(torch.equal(before[k], after[k]) for k in before)}
(out / f"rank{ranks.rank}.json").write_text(json.dumps(results))
ranks.close()
