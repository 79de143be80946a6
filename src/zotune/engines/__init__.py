"""Engines that run the training step: eager PyTorch and exported programs (ExecuTorch).

Submodules are imported on demand (`zotune.engines.executorch` pulls in ExecuTorch)."""
