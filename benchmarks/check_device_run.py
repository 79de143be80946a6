"""Checks on a finished `zotune device-train` run with a real model:
1. its replay log, replayed in eager PyTorch with no model, rebuilds the adapter the device wrote;
2. that adapter loads with peft.PeftModel.from_pretrained on the base model, and PEFT's logits on
   a few test prompts equal zotune's own forward with the same adapter.

    .venv/bin/python benchmarks/check_device_run.py runs/device-train [--rows 16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--rows", type=int, default=16)
    args = p.parse_args()
    run = Path(args.run_dir)
    from peft import PeftModel

    from zotune.adapters.peft_io import load_peft
    from zotune.config import load_config
    from zotune.engines.eager import EagerEngine
    from zotune.models import load_model
    from zotune.train.run import encode_splits, replay

    cfg = load_config(str(run / "config.yaml"))
    device = load_file(run / "adapter" / "adapter_model.safetensors")
    with tempfile.TemporaryDirectory() as tmp:
        rebuilt = load_file(replay(str(run / "replay.jsonl"), tmp) / "adapter_model.safetensors")
    # The replay log holds every step; the device adapter is the dev-selected one.
    selected = json.loads((run / "summary.json").read_text())["selected_step"]
    steps = sum(
        1
        for line in (run / "replay.jsonl").read_text().splitlines()
        if json.loads(line).get("type") == "step"
    )
    replay_diff = max(float((device[k] - rebuilt[k]).abs().max()) for k in device)

    model, tokenizer, _ = load_model(cfg.model.name)
    splits = encode_splits(cfg, tokenizer)
    test = splits.test.index(torch.arange(args.rows))
    peft_model = PeftModel.from_pretrained(model, str(run / "adapter")).eval()
    with torch.no_grad():
        out = peft_model(
            input_ids=test.input_ids, attention_mask=test.attention_mask, position_ids=test.position_ids
        )
        peft_logits = out.logits[:, -1].gather(1, test.choice_ids)  # [rows, C]
    base, _, _ = load_model(cfg.model.name)
    engine = EagerEngine(base, cfg, splits.kind)
    engine.params.load_state(load_peft(str(run / "adapter"))[1])
    (ours,) = engine.scores(
        (test.input_ids, test.attention_mask, test.position_ids, test.choice_ids, test.labels)
    )
    res = {
        "replay_steps": steps,
        "selected_step": selected,
        "replay_vs_device_max_abs_B": replay_diff if selected == steps else None,
        "peft_vs_zotune_max_abs_logit": float((peft_logits - ours).abs().max()),
        "rows": args.rows,
    }
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
