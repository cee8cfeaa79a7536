"""The LightningModule: our plain-PyTorch ``Transformer`` trained with next-token cross-entropy."""

from __future__ import annotations

from dataclasses import asdict

import lightning as L
import torch

from residual_dynamics.training.model import ModelConfig, Transformer
from residual_dynamics.training.optim import OptimConfig, build_optimizer, build_scheduler


class LitTransformer(L.LightningModule):
    """Takes the typed ``ModelConfig`` and ``OptimConfig``; saves them in checkpoints with ``asdict``
    (``hyper_parameters["model"]``, ``["optim"]``), so a checkpoint describes its model without code."""

    def __init__(self, model: ModelConfig, optim: OptimConfig, max_steps: int, compile: bool = False):
        super().__init__()
        self.save_hyperparameters({"model": asdict(model), "optim": asdict(optim), "max_steps": max_steps,
                                   "compile": compile})
        self.model = Transformer(model)
        self.optim_cfg = optim
        self.max_steps = max_steps
        # torch.compile wraps the forward only, so checkpoints keep plain parameter names
        self._forward_loss = torch.compile(self.model.loss) if compile else self.model.loss

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._forward_loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val/loss", self.model.loss(batch), prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.optim_cfg)
        scheduler = build_scheduler(optimizer, self.optim_cfg, self.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
