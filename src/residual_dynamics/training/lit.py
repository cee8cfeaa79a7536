"""The LightningModule: our plain-PyTorch ``Transformer`` trained with next-token cross-entropy."""

from __future__ import annotations

from dataclasses import asdict
from typing import Optional

import lightning as L
import torch

from residual_dynamics.training.model import ModelConfig, Transformer
from residual_dynamics.training.optim import OptimConfig, build_optimizer, build_scheduler


class LitTransformer(L.LightningModule):
    """Takes the typed ``ModelConfig`` and ``OptimConfig``; saves them in checkpoints with ``asdict``
    (``hyper_parameters["model"]``, ``["optim"]``), so a checkpoint describes its model without code, and
    the fingerprint of the tokenizer the model is trained with (``["data"]["tokenizer_fingerprint"]``,
    :func:`residual_dynamics.data.tokenizer.tokenizer_fingerprint`), so a resume with another tokenizer is
    refused."""

    def __init__(self, model: ModelConfig, optim: OptimConfig, max_steps: int, compile: bool = False,
                 tokenizer_fingerprint: Optional[str] = None):
        super().__init__()
        self.save_hyperparameters({"model": asdict(model), "optim": asdict(optim), "max_steps": max_steps,
                                   "compile": compile, "data": {"tokenizer_fingerprint": tokenizer_fingerprint}})
        self.model = Transformer(model)
        self.optim_cfg = optim
        self.max_steps = max_steps
        # torch.compile wraps the forward only, so checkpoints keep plain parameter names
        self._forward_loss = torch.compile(self.model.loss) if compile else self.model.loss

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._forward_loss(batch)
        if self._logging_step():
            self.log("train/loss", loss, prog_bar=True)
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def _logging_step(self) -> bool:
        """Whether Lightning sends this step's metrics to the loggers: every ``log_every_n_steps``-th optimizer
        step (its own rule: ``(steps done + 1) % log_every_n_steps == 0``). ``self.log`` costs ~1 ms a call on
        CPU, so the other steps skip it; the loggers receive exactly the same values, and the progress bar
        shows the loss of the latest logging step."""
        every = self.trainer.log_every_n_steps
        return every > 0 and (self.global_step + 1) % every == 0

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val/loss", self.model.loss(batch), prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.model, self.optim_cfg)
        scheduler = build_scheduler(optimizer, self.optim_cfg, self.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
