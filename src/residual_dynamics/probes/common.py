"""Shared pieces of every probe: the record format and the token-position mask.

Every probe returns a dataclass of tensors (on the host) with a ``records()`` method that flattens it
into :class:`Record` rows. The W&B key of a row and the row of the local results file are both derived
from a Record in one place (``residual_dynamics.reporting.results``), so trained and pretrained runs share a schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

import torch

from residual_dynamics.errors import ConfigError


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
    MLP blocks). Raised by a probe function called directly; ``run_probes`` asks the same question
    (``ProbeSpec.unsupported(arch)``) before running a probe and returns an :class:`Unsupported` result
    that says why, instead of failing the whole run."""


@dataclass
class Unsupported:
    """The result of a probe that cannot run on this architecture (the probe did not run): no records,
    only the reason."""

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


def raise_if_unsupported(reason: Optional[str]) -> None:
    """Raise :class:`ProbeUnsupported` with ``reason`` unless it is None: how a probe function called
    directly refuses an architecture, with the same ``<probe>_unsupported(arch)`` the registry asks."""
    if reason is not None:
        raise ProbeUnsupported(reason)


# --- option checks: ConfigError(<option name>, message), before any compute ---------------------------


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_sequence(value) -> bool:
    """A list-like value (list, tuple, OmegaConf ListConfig), not a string."""
    from collections.abc import Sequence

    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def check_bool(value, field: str) -> None:
    if not isinstance(value, bool):
        raise ConfigError(field, f"must be true or false, got {value!r}")


def check_int(value, field: str, minimum: Optional[int] = None, maximum: Optional[int] = None,
              optional: bool = False) -> None:
    """``value`` is an integer (not a bool) in [minimum, maximum] (or None when ``optional``)."""
    if value is None and optional:
        return
    if not _is_int(value):
        raise ConfigError(field, f"must be an integer{' or null' if optional else ''}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(field, f"must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(field, f"must be <= {maximum}, got {value!r}")


def check_number(value, field: str) -> float:
    """``value`` is a finite real number (int or float, not a bool); returns it as a float."""
    import math

    if not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        raise ConfigError(field, f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(field, f"must be a finite number, got {value!r}")
    return float(value)


def check_choice(value, field: str, choices: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(field, f"must be one of {list(choices)}, got {value!r}")


def check_int_list(value, field: str, optional: bool = True) -> list:
    """``value`` is a list of integers (or None when ``optional``); returns it as a list ([] for None)."""
    if value is None and optional:
        return []
    if not is_sequence(value):
        raise ConfigError(field, f"must be a list of integers{' or null' if optional else ''}, got {value!r}")
    items = list(value)
    bad = [item for item in items if not _is_int(item)]
    if bad:
        raise ConfigError(field, f"must be a list of integers, got {value!r} ({bad[0]!r} is not an integer)")
    return items


def check_layer_pair(value, field: str, n_layers: Optional[int]) -> None:
    """None, or two layers [a, b] with 0 <= a < b < n_layers (the range check needs ``n_layers``)."""
    if value is None:
        return
    items = check_int_list(value, field)
    if len(items) != 2:
        raise ConfigError(field, f"must be two layers [a, b], got {value!r}")
    a, b = items
    if n_layers is None:
        if not 0 <= a < b:
            raise ConfigError(field, f"must be two layers 0 <= a < b, got {value!r}")
    elif not 0 <= a < b < n_layers:
        raise ConfigError(field, f"must be two layers 0 <= a < b < n_layers={n_layers}, got {value!r}")


# --- memory budget (``probes.max_memory``) --------------------------------------------------------------

#: The default budget of every probe's own memory (``probes.max_memory``).
DEFAULT_MAX_MEMORY = "2GB"
# the share of max_memory a probe's memory estimate may fill: the rest covers the allocator's overhead and
# small temporaries the estimates leave out (measured on GPT-2 XL, benchmarks/bench_scale.py: clean-up's
# peak ~1.12 x its estimate)
PLANNED_SHARE = 0.85

_BYTE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_bytes(value, field: str = "max_memory") -> int:
    """A memory size in bytes from an integer number of bytes or a string ``"<number>[unit]"``: units B,
    KB, MB, GB, TB (powers of 1000) and KiB, MiB, GiB, TiB (powers of 1024), case-insensitive, e.g.
    ``"2GB"``, ``"1.5 GiB"``, ``"512MB"``, ``"2000000000"``. Raises ConfigError(field, ...) otherwise or
    for a size that is not positive."""
    import re

    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(field, f"must be a memory size like '2GB' or a number of bytes, got {value!r}")
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*", value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _BYTE_UNITS:
            raise ConfigError(field, f"must be a memory size like '2GB', '512MiB' or a number of bytes "
                                     f"(units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), got {value!r}")
        size = float(match.group(1)) * _BYTE_UNITS[unit]
    else:
        size = float(value)
    if not 1 <= size < float("inf"):
        raise ConfigError(field, f"must be a positive memory size, got {value!r}")
    return int(size)


def check_max_memory(value, field: str = "max_memory") -> None:
    """None (use ``probes.max_memory``), or a size :func:`parse_bytes` accepts."""
    if value is not None:
        parse_bytes(value, field)


def memory_budget(max_memory) -> int:
    """The budget in bytes: ``max_memory`` parsed, or :data:`DEFAULT_MAX_MEMORY` when None."""
    return parse_bytes(DEFAULT_MAX_MEMORY if max_memory is None else max_memory)


def format_bytes(size: float) -> str:
    """``1.23GB`` style (powers of 1000)."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if abs(size) >= scale:
            return f"{size / scale:.2f}{unit}"
    return f"{int(size)}B"


def forward_bytes_per_row(*, seq: int, d_model: int, d_mlp: Optional[int], n_heads: int, d_vocab: int,
                          logits: bool = True, element_size: int = 4) -> int:
    """An upper estimate of the transient memory of one forward pass per batch row of ``seq`` tokens:
    a few residual-sized tensors, the attention scores and pattern (eager attention), the MLP hidden
    activations, and (``logits``) the [seq, d_vocab] logits with a float copy for the loss or top-k."""
    per_token = 8 * d_model + 3 * (d_mlp or 0) + (2 * d_vocab if logits else 0)
    return element_size * (seq * per_token + 4 * n_heads * seq * seq)


def does_not_fit(probe: str, needed: int, budget: int, hint: str) -> "Unsupported":
    """The result of a probe that cannot run within ``budget`` bytes even at its smallest chunk."""
    return Unsupported(note=f"{probe}: needs about {format_bytes(needed)} even at its smallest chunk, more than "
                            f"probes.max_memory={format_bytes(budget)}; {hint}")
