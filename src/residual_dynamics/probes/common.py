"""Shared pieces of every probe: the record format and the token-position mask.

Every probe returns a dataclass of tensors (on the host) with a ``records()`` method that flattens it
into :class:`Record` rows. The W&B key of a row and the row of the local results file are both derived
from a Record in one place (``residual_dynamics.results``), so trained and pretrained runs share a schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch


@dataclass(frozen=True)
class Record:
    """One measurement.

    name:  slash-separated metric name below ``probe/``, e.g. ``resid_norm/resid_post``, ``W_OV``,
           ``growth_rate`` or ``horizon/k_eff``.
    layer: layer index, or None for model-level scalars.
    head:  head index, or None.
    value: the number.
    """

    name: str
    value: float
    layer: Optional[int] = None
    head: Optional[int] = None


class ProbeResult(Protocol):
    def records(self) -> list[Record]: ...


class ProbeUnsupported(Exception):
    """The model's architecture lacks what a probe needs (e.g. a sublayer order for parallel attention +
    MLP blocks). ``run_probes`` turns it into an :class:`Unsupported` result that says so, instead of
    failing the whole run."""


@dataclass
class Unsupported:
    """The result of a probe that cannot run on this architecture: no records, only the reason."""

    note: str

    def records(self) -> list[Record]:
        return []


def position_mask(tokens: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean [batch, pos] mask of the positions that enter statistics.

    Position 0 (BOS / attention sink, norms ~100x the rest) is always dropped, and so is padding
    (``attention_mask == 0``). Padding is assumed to be on the right.
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
    mask = torch.ones_like(tokens, dtype=torch.bool)
    if attention_mask is not None:
        if attention_mask.shape != tokens.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != tokens shape {tuple(tokens.shape)}"
            )
        mask &= attention_mask.to(device=tokens.device).bool()
    mask[:, 0] = False
    if not mask.any():
        raise ValueError("no token positions left after dropping position 0 and padding: use sequences of length >= 2")
    return mask


def n_layers(bridge) -> int:
    return int(bridge.cfg.n_layers)
