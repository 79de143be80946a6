"""Golden losses: a tiny model, a fixed seed, 10 steps of each estimator, against values recorded
once. A change here means every run's numbers changed: look for why before re-recording."""

import pytest
import torch

from helpers import synthetic_batch
from zotune.adapters.lora import LoRAAdapter
from zotune.estimators.fo import FirstOrder
from zotune.estimators.prge import PRGEStep
from zotune.estimators.rge import RGE
from zotune.loss import ClassificationLoss
from zotune.models.tiny import make_tiny_model
from zotune.rng import step_seed


def run(tokenizer, estimator: str) -> list[float]:
    model = make_tiny_model("llama", tokenizer, seed=0)
    adapter = LoRAAdapter(model, rank=4, alpha=8, init_seed=0)
    loss = ClassificationLoss()
    if estimator == "prge":
        prge = PRGEStep(model, adapter, loss, q=4)
        step = lambda b, s: prge(torch.tensor([s]), 0.05, 1e-2, *b)[0]  # noqa: E731
    elif estimator == "rge":
        rge = RGE(model, adapter, loss, q=4)
        step = lambda b, s: rge.step(b, s, 0.05, 1e-2)[0]  # noqa: E731
    else:
        fo = FirstOrder(model, adapter, loss, "adamw", 1e-2)
        step = lambda b, s: fo.step(b, s, 1e-2, 0.0)[0]  # noqa: E731
    return [float(step(synthetic_batch(seed=i), step_seed(0, i))) for i in range(10)]


@pytest.mark.parametrize("estimator", ["prge", "rge", "fo"])
def test_golden_losses(tokenizer, estimator):
    losses = run(tokenizer, estimator)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(GOLDEN[estimator]),
                               rtol=1e-4, atol=1e-5)


GOLDEN = {
    'prge': [0.626974, 0.740799, 0.794362, 0.739113, 0.703617, 0.692011, 0.808314, 0.707681, 0.644417, 0.728197],
    'rge': [0.626974, 0.740799, 0.794362, 0.739113, 0.703617, 0.692011, 0.808314, 0.707681, 0.644417, 0.728197],
    'fo': [0.627161, 0.788861, 0.882766, 0.657456, 0.751572, 0.725529, 0.920656, 0.71029, 0.658563, 0.654683],
}
