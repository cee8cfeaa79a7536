"""Effective layer horizon: how much loss rises when every reader only sees the last k outputs.

Definition (TurnTrout, "Effective layer horizon"; measured by Joseph Miller on GPT-2 small / XL).
Number the outputs written to the residual stream in forward order::

    o_{-1} = embedding (token + positional, i.e. ``blocks.0.hook_resid_pre``)
    o_0 = attn_0, o_1 = mlp_0, o_2 = attn_1, o_3 = mlp_1, ...      (attn-only models: o_l = attn_l)

so the usual input of sublayer s of a sequential block is ``o_{-1} + o_0 + ... + o_{s-1}``. For a horizon
k, every reader (a sublayer, or the final norm + unembedding when ``unembed_reads_window``) that has at
least k units before it reads, IN PLACE OF its usual residual input, the window of the outputs of the
last k units before it. The unit is set by ``unit``:

* ``unit="sublayer"`` (default): the window of sublayer s is ``o_{s-k} + ... + o_{s-1}`` (k outputs),
  for readers with at least k sublayers before them.
* ``unit="layer"`` (the write-up's per-layer horizon, as in Joseph Miller's GPT-2 experiments): the
  attention of layer n reads the outputs of layers n-k .. n-1 (attention and MLP of each), and its MLP
  reads those plus the output of attention n; readers of layers n >= k are windowed. The final norm +
  unembedding read the outputs of layers L-k .. L-1. Attention-only models: layers are sublayers.

Either way the window includes the embedding or not as set by ``include_embedding``::

    include_embedding=True:   w = the window's outputs
    include_embedding=False:  w = o_{-1} + the window's outputs

Readers with fewer than k units before them read their usual input. The residual stream itself is
untouched: each sublayer still adds its (now modified) output to it.

Parallel blocks (GPT-NeoX / Pythia, GPT-J): attention and MLP of block n read the same input, so both
read the SAME truncated window, the one that ends where block n begins (o_{2n-k} .. o_{2n-1} in sublayer
units, layers n-k .. n-1 in layer units); their two outputs o_{2n} (attention) and o_{2n+1} (MLP) are
written at the same time, so the MLP of block n never sees the attention of block n. Blocks with one
shared pre-norm (GPT-J) read it once: replacing its input windows both.

* ``include_embedding=True``: the embedding is output -1 of the sequence and is subject to the horizon
  like any sublayer output: it is in the window only while it is among the last k outputs, which for a
  windowed reader never happens, so windowed readers do not see it.
* ``include_embedding=False``: the embedding is kept out of the sequence of outputs, so it never takes
  one of the window slots and is never truncated: every windowed reader sees it next to its window.
  (Leaving it out of the window without adding it back would give exactly the ``True`` numbers.)
* ``unembed_reads_window=False``: the final norm + unembedding read the full residual stream of the
  modified pass. ``True``: they read the window of the last k units of the MODIFIED pass (the outputs the
  windowed sublayers actually produced; taking them from the clean run instead would make the loss
  independent of every sublayer edit), in both modes.
* ``mode="clean"`` (the definition): the o_j inside sublayer windows come from an unmodified run, so
  every sublayer sees a truncated clean stream. ``mode="same_pass"`` (Joseph Miller's forward pass):
  the o_j are the outputs of the modified forward pass itself, so truncation compounds.

Loss: mean next-token cross-entropy (nats) of the prediction at position p for token p+1, over
positions p >= 1 where both p and p+1 are real tokens (position 0 and padding are excluded, as in
:func:`position_mask`); the per-token losses of every chunk of rows are kept (one number per token) and
averaged once, so the chunking never changes the result.
``loss_increase(k) = loss(k) - loss_clean``; the effective horizon is the smallest k in ``ks`` with
``loss_increase(k) <= tolerance``; ``decay_amplitude`` A and ``decay_tau`` tau fit
``loss_increase(k) ~= A exp(-k / tau)`` by least squares on ``log loss_increase`` over the positive
increases (NaN with fewer than two).

Cost and memory: the batch is split into chunks of rows; for each chunk, one clean forward, then hooked
forwards on the chunk repeated for a chunk of the k values (copy c of the repeated rows enforcing
``ks[c]``), so a sweep costs about K + 1 forward passes of the probe batch, not K x layers. The row and
k chunks are set by ``max_memory`` (:func:`plan`; one copy per forward on CPU, where a K-times larger
batch runs slower per token, as many copies as fit on accelerators) and capped by ``max_batch``: no
forward ever holds more than its chunk's copies of the logits. Sublayer inputs are replaced at
``blocks.{l}.ln1.hook_in`` / ``blocks.{l}.ln2.hook_in`` (the input of the pre-norm, or of the identity
slot where a model has no norm), which changes what the sublayer reads but not the residual stream it
adds to; the final norm reads through ``ln_final.hook_in``.

Records (``unit="sublayer"``): ``horizon/loss_clean``; ``horizon/loss_increase/k{k:02d}`` per k (e.g.
``.../k03``; the k is in the name because it is neither a layer nor a head); ``horizon/k_eff`` (-1 if no
k reaches the tolerance); ``horizon/decay_amplitude`` and ``horizon/decay_tau``. With ``unit="layer"``
the same records are named ``horizon/layers/...`` (``horizon/layers/k_eff``, ...), so numbers in the two
units never share a key. All have layer=None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Literal, Optional, Sequence

import torch
import torch.nn.functional as F

from residual_dynamics.errors import ConfigError
from residual_dynamics.probes.arch import Arch, Sublayer
from residual_dynamics.probes.forward import pattern_release_hooks
from residual_dynamics.probes.common import (
    Record,
    check_bool,
    check_choice,
    check_int,
    check_int_list,
    check_max_memory,
    check_number,
    does_not_fit,
    forward_bytes_per_row,
    memory_budget,
    position_mask,
    raise_if_unsupported,
)

Mode = Literal["clean", "same_pass"]
MODES = ("clean", "same_pass")
UNITS = ("sublayer", "layer")


@dataclass
class Options:
    """The keyword options of :func:`layer_horizon` (the ``probes.layer_horizon`` config section); see
    the module doc.

    ks:                   horizons to sweep, integers in 1..n_sublayers (1..n_layers with unit=layer);
                          null = 1, 2, 4, ... (default_ks).
    mode:                 "clean" or "same_pass".
    unit:                 "sublayer" (k counts attention and MLP separately) or "layer".
    include_embedding:    whether the embedding is output -1 of the sequence (True) or always seen (False).
    unembed_reads_window: whether the final norm + unembedding read the window too.
    tolerance:            loss increase (nats, > 0) within which a horizon counts as effective.
    max_batch:            most rows per hooked forward (>= 1); null = set by the memory budget alone.
    max_memory:           memory budget of the probe (e.g. "2GB"); null = ``probes.max_memory``.
    """

    ks: Optional[List[int]] = None
    mode: str = "clean"
    unit: str = "sublayer"
    include_embedding: bool = True
    unembed_reads_window: bool = False
    tolerance: float = 0.05
    max_batch: Optional[int] = None
    max_memory: Optional[str] = None

    def check(self, arch: Arch) -> None:
        """Raise ConfigError(<option>, message) for a bad value; runs no probe."""
        check_choice(self.unit, "unit", UNITS)
        if self.ks is not None:
            ks = check_int_list(self.ks, "ks")
            if not ks:
                raise ConfigError("ks", "must be a non-empty list of horizons, or null for the default")
            top = n_units(arch, self.unit) if arch.known else None
            bad = [k for k in ks if k < 1 or (top is not None and k > top)]
            if bad:
                what = "sublayers" if self.unit == "sublayer" else "layers"
                where = f"1..{top} (the model's number of {what})" if top is not None else ">= 1"
                raise ConfigError("ks", f"horizons must be integers in {where}, got {bad[0]!r} in {self.ks!r}")
        check_choice(self.mode, "mode", MODES)
        check_bool(self.include_embedding, "include_embedding")
        check_bool(self.unembed_reads_window, "unembed_reads_window")
        if check_number(self.tolerance, "tolerance") <= 0:
            raise ConfigError("tolerance", f"must be > 0, got {self.tolerance!r}")
        check_int(self.max_batch, "max_batch", minimum=1, optional=True)
        check_max_memory(self.max_memory)


def n_units(arch: Arch, unit: str) -> int:
    """The number of units k counts on ``arch``: sublayers or layers."""
    return arch.n_sublayers if unit == "sublayer" else arch.n_layers


def unsupported(arch: Arch) -> Optional[str]:
    """Why :func:`layer_horizon` cannot run on ``arch``, or None."""
    kinds = ["resid_pre", "ln_final_in", "ln1_in", "attn_out"]
    if arch.has_mlp:
        # a parallel block without its own MLP pre-norm (GPT-J) feeds the MLP from ln1
        kinds += ["mlp_out"] + ([] if arch.parallel else ["ln2_in"])
    missing = arch.missing(*kinds)
    if missing:
        return f"layer_horizon: the bridge has no hook points {missing}"
    return None


@dataclass(frozen=True)
class HorizonPlan:
    """How :func:`layer_horizon` splits its work: ``rows`` batch rows per chunk, ``copies`` k values per
    hooked forward; ``bytes`` is the estimated peak of the probe's own memory."""

    rows: int
    copies: int
    bytes: int


@dataclass
class HorizonResult:
    """Loss as a function of the enforced layer horizon (all tensors on the host).

    ks:              [K] int64, the horizons, ascending.
    loss:            [K] loss with horizon k enforced.
    loss_clean:      [] loss of the unmodified model on the same positions.
    loss_increase:   [K] loss - loss_clean.
    k_eff:           [] int64, smallest k with loss_increase <= tolerance, -1 if none.
    decay_amplitude: [] A of loss_increase(k) ~= A exp(-k / tau); NaN if < 2 positive increases.
    decay_tau:       [] tau of that fit (inf for a flat fit, negative if the increase grows with k).
    unit:            "sublayer" or "layer" (what k counts).
    plan:            the chunking used (:class:`HorizonPlan`).
    """

    ks: torch.Tensor
    loss: torch.Tensor
    loss_clean: torch.Tensor
    loss_increase: torch.Tensor
    k_eff: torch.Tensor
    decay_amplitude: torch.Tensor
    decay_tau: torch.Tensor
    mode: str
    include_embedding: bool
    unembed_reads_window: bool
    tolerance: float
    unit: str = "sublayer"
    plan: Optional[HorizonPlan] = None

    def records(self) -> list[Record]:
        prefix = "horizon" if self.unit == "sublayer" else "horizon/layers"
        rows = [Record(f"{prefix}/loss_clean", float(self.loss_clean))]
        rows += [
            Record(f"{prefix}/loss_increase/k{int(k):02d}", float(increase))
            for k, increase in zip(self.ks, self.loss_increase)
        ]
        rows += [
            Record(f"{prefix}/k_eff", float(self.k_eff)),
            Record(f"{prefix}/decay_amplitude", float(self.decay_amplitude)),
            Record(f"{prefix}/decay_tau", float(self.decay_tau)),
        ]
        return rows


def sublayers(bridge, arch: Optional[Arch] = None) -> list[Sublayer]:
    """The sublayers in forward order (``arch.sublayers``: attn_0, mlp_0, attn_1, ...; attention-only
    models: attns only); raises ProbeUnsupported where the horizon cannot run (:func:`unsupported`)."""
    arch = Arch.of(bridge) if arch is None else arch
    raise_if_unsupported(unsupported(arch))
    return list(arch.sublayers)


def default_ks(n: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to ``n`` (the number of sublayers, or of layers with unit=layer)."""
    return tuple(2**i for i in range(n.bit_length()))


@dataclass(frozen=True)
class _Reader:
    """A point where the probe replaces what a sublayer (or the final norm) reads.

    hooks: the hook points replaced (one per reader; a parallel block with a shared pre-norm has one
           reader for both sublayers).
    layer: its block (n_layers for the final norm + unembedding).
    end:   the outputs it normally reads are o_{-1} .. o_{end-1} (sublayer indices; parallel blocks:
           2 x layer for both sublayers).
    own:   outputs of its own block among those (the MLP of a sequential block reads attention: 1).
    """

    hooks: tuple[str, ...]
    layer: int
    end: int
    own: int

    def span(self, k: int, unit: str, per_layer: int) -> Optional[tuple[int, int]]:
        """[start, end) of the sublayer outputs in its window at horizon k, or None when the reader has
        fewer than k units before it (it then reads its usual input)."""
        if unit == "sublayer":
            return (self.end - k, self.end) if self.end >= k else None
        return (self.end - self.own - per_layer * k, self.end) if self.layer >= k else None


def _readers(arch: Arch) -> list[_Reader]:
    """The sublayer readers in forward order (see :class:`_Reader`)."""
    out = []
    for sub in arch.sublayers:
        if arch.parallel:
            if sub.kind == "mlp" and not arch.has("ln2_in"):
                continue  # one shared pre-norm: the attention's reader feeds both
            out.append(_Reader((sub.input_hook,), sub.layer, arch.sublayer_index("attn", sub.layer), 0))
        else:
            out.append(_Reader((sub.input_hook,), sub.layer, sub.index, 1 if sub.kind == "mlp" else 0))
    return out


def plan(arch: Arch, *, batch: int, seq: int, d_vocab: int, n_ks: int, max_span: int, mode: str,
         include_embedding: bool, unembed_reads_window: bool, budget: int, max_batch: Optional[int],
         accelerator: bool) -> tuple[Optional[HorizonPlan], int]:
    """The chunking of a sweep within ``budget`` bytes: (plan, bytes needed at the smallest chunk), with
    plan None when even one row and one copy per forward do not fit.

    Per row of a chunk the probe holds the clean outputs of every sublayer (clean mode) and the
    embedding (``include_embedding=False``); per row and copy of a hooked forward, the forward's own
    working set (logits included, :func:`forward_bytes_per_row`) and, when the pass records its own
    outputs (same_pass or ``unembed_reads_window``), the last ``max_span`` + 1 outputs."""
    d = arch.d_model
    resid = 4 * seq * d
    per_row = (arch.n_sublayers * resid if mode == "clean" else 0) + (0 if include_embedding else resid)
    records = mode == "same_pass" or unembed_reads_window
    per_copy = (forward_bytes_per_row(seq=seq, d_model=d, d_mlp=arch.d_mlp, n_heads=arch.n_heads, d_vocab=d_vocab)
                + ((max_span + 1) * resid if records else 0) + 2 * resid)

    def need(rows: int, copies: int) -> int:
        return rows * (per_row + copies * per_copy)

    smallest = need(1, 1)
    if smallest > budget:
        return None, smallest
    rows = batch if max_batch is None else min(batch, max_batch)
    while rows > 1 and need(rows, 1) > budget:
        rows = (rows + 1) // 2
    if max_batch is not None:
        copies = max(1, max_batch // rows) if rows == batch else 1
    else:
        copies = n_ks if accelerator else 1
    copies = max(1, min(copies, n_ks, (budget - rows * per_row) // (rows * per_copy)))
    return HorizonPlan(rows=rows, copies=copies, bytes=need(rows, copies)), smallest


def layer_horizon(
    bridge,
    tokens: torch.Tensor,
    *,
    ks: Optional[Sequence[int]] = None,
    mode: Mode = "clean",
    unit: str = "sublayer",
    include_embedding: bool = True,
    unembed_reads_window: bool = False,
    tolerance: float = 0.05,
    attention_mask: Optional[torch.Tensor] = None,
    max_batch: Optional[int] = None,
    max_memory: Optional[str] = None,
    arch: Optional[Arch] = None,
):
    """Sweep the enforced layer horizon k over ``ks`` (default :func:`default_ks` of the number of units);
    see the module doc.

    ``max_memory`` (bytes or e.g. "2GB"; default ``DEFAULT_MAX_MEMORY``) bounds the probe's own memory
    and sets the row and k chunks (:func:`plan`); ``max_batch`` caps the rows of one hooked forward
    (copies of the batch x rows). On CPU the default runs one copy per forward (a K-times larger batch
    runs slower per token there: benchmarks/bench_horizon.py), on accelerators as many copies as fit.
    Either way the sweep costs K + 1 forward passes of the probe batch. Returns an :class:`Unsupported`
    with a note when even one row and one k per forward do not fit the budget. ``arch``: the model's
    :class:`~residual_dynamics.probes.arch.Arch` (built from the bridge if not given). Raises
    ProbeUnsupported on missing hook points (:func:`unsupported`).
    """
    if mode not in MODES:
        raise ValueError(f"layer_horizon: mode must be 'clean' or 'same_pass', got {mode!r}")
    if unit not in UNITS:
        raise ValueError(f"layer_horizon: unit must be 'sublayer' or 'layer', got {unit!r}")
    arch = Arch.of(bridge) if arch is None else arch
    subs = sublayers(bridge, arch)
    ks = sorted(set(default_ks(n_units(arch, unit)) if ks is None else (int(k) for k in ks)))
    if not ks or ks[0] < 1:
        raise ValueError(f"layer_horizon: ks must be positive integers, got {ks}")
    batch = tokens.shape[0]
    mask = position_mask(tokens, attention_mask)
    scored = mask[:, :-1] & mask[:, 1:]  # prediction at p scored iff p >= 1 and p, p+1 are real
    if not scored.any():
        raise ValueError("layer_horizon: no scored predictions; use sequences of length >= 3")

    per_layer = 2 if arch.has_mlp else 1
    readers = _readers(arch)
    final = _Reader((arch.hook("ln_final_in"),), arch.n_layers, len(subs), 0)
    spans = [final.span(k, unit, per_layer) for k in ks] + [r.span(k, unit, per_layer) for r in readers for k in ks]
    max_span = max([hi - lo for lo, hi in (s for s in spans if s is not None)], default=0)
    budget = memory_budget(max_memory)
    chunking, smallest = plan(
        arch, batch=batch, seq=tokens.shape[1], d_vocab=int(bridge.cfg.d_vocab), n_ks=len(ks), max_span=max_span,
        mode=mode, include_embedding=include_embedding, unembed_reads_window=unembed_reads_window,
        budget=budget, max_batch=max_batch, accelerator=tokens.device.type != "cpu")
    if chunking is None:
        return does_not_fit("layer_horizon", smallest, budget,
                            "raise probes.max_memory or use fewer prompts or shorter ones")

    # per-token losses of the scored predictions, kept on the device chunk by chunk (in row order) and
    # averaged once at the end: the same numbers, in the same order, however the rows are chunked
    clean_losses: list[torch.Tensor] = []
    k_losses: list[list[torch.Tensor]] = [[] for _ in ks]
    with torch.no_grad():
        for start in range(0, batch, chunking.rows):
            rows = slice(start, min(start + chunking.rows, batch))
            row_tokens = tokens[rows]
            row_mask = None if attention_mask is None else attention_mask[rows]
            row_scored = scored[rows]
            clean: dict[str, dict[int, torch.Tensor]] = {"embedding": {}, "outputs": {}}

            def keep(key: str, index: int):
                return lambda x, hook: clean[key].__setitem__(index, x)

            keep_hooks = []
            if not include_embedding:
                keep_hooks.append((arch.hook("resid_pre", 0), keep("embedding", -1)))
            if mode == "clean":
                keep_hooks += [(sub.output_hook, keep("outputs", s)) for s, sub in enumerate(subs)]
            forward_kwargs = {} if row_mask is None else {"attention_mask": row_mask}
            logits = bridge.run_with_hooks(row_tokens, fwd_hooks=keep_hooks + pattern_release_hooks(bridge, arch),
                                            **forward_kwargs)
            clean_losses.append(_token_losses(logits, row_tokens, row_scored))
            del logits
            embedding = clean["embedding"].get(-1)
            for k_start in range(0, len(ks), chunking.copies):
                chunk_ks = ks[k_start : k_start + chunking.copies]
                losses = _windowed_token_losses(
                    bridge, row_tokens, _Windows(chunk_ks, row_tokens.shape[0], embedding, unit, per_layer),
                    subs, readers, final, clean["outputs"] if mode == "clean" else None,
                    unembed_reads_window, row_mask, row_scored)
                for offset, values in enumerate(losses):
                    k_losses[k_start + offset].append(values)
            clean = embedding = None  # free this chunk's outputs before the next

    loss = torch.stack([torch.cat(values).mean() for values in k_losses]).double().cpu()
    loss_clean = torch.cat(clean_losses).mean().double().cpu()
    increase = loss - loss_clean
    ks_tensor = torch.tensor(ks, dtype=torch.int64)
    within = (increase <= tolerance).nonzero()
    k_eff = ks_tensor[within[0, 0]] if len(within) else torch.tensor(-1)
    amplitude, tau = _exponential_fit(ks_tensor.double(), increase)
    return HorizonResult(
        ks=ks_tensor,
        loss=loss,
        loss_clean=loss_clean,
        loss_increase=increase,
        k_eff=k_eff,
        decay_amplitude=amplitude,
        decay_tau=tau,
        mode=mode,
        include_embedding=include_embedding,
        unembed_reads_window=unembed_reads_window,
        tolerance=tolerance,
        unit=unit,
        plan=chunking,
    )


def _windowed_token_losses(
    bridge,
    tokens: torch.Tensor,
    windows: "_Windows",
    subs: list[Sublayer],
    readers: list[_Reader],
    final: _Reader,
    clean_outputs: Optional[dict[int, torch.Tensor]],
    unembed_reads_window: bool,
    attention_mask: Optional[torch.Tensor],
    scored: torch.Tensor,
) -> list[torch.Tensor]:
    """Per-token losses of each copy of ``windows`` from one hooked forward on the rows repeated per copy.

    ``clean_outputs``: the clean run's sublayer outputs (these rows) for the clean mode, None for the
    same pass; the final reader always reads the pass's own outputs.
    """

    def read(reader: _Reader, source: Optional[dict[int, torch.Tensor]]):
        def hook_fn(x: torch.Tensor, hook) -> Optional[torch.Tensor]:
            return windows.replace(x, reader, source)

        return hook_fn

    record_pass = clean_outputs is None or unembed_reads_window
    hooks = []
    for reader in readers:
        hooks += [(name, read(reader, clean_outputs)) for name in reader.hooks]
    if record_pass:
        hooks += [(sub.output_hook, windows.pusher(s)) for s, sub in enumerate(subs)]
    if unembed_reads_window:
        hooks.append((final.hooks[0], read(final, None)))

    copies = len(windows.ks)
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask.repeat(copies, 1)}
    logits = bridge.run_with_hooks(tokens.repeat(copies, 1), fwd_hooks=hooks + pattern_release_hooks(bridge),
                                    **kwargs)
    return [_token_losses(chunk, tokens, scored) for chunk in logits.split(tokens.shape[0], dim=0)]


class _Windows:
    """Window sums for the repeated rows: copy c (rows c*B .. c*B+B-1) enforces horizon ks[c].

    ``pusher(s)`` records output o_s of the modified pass; each copy keeps a private copy of only the
    outputs its windows can still reach (a view would keep the whole [K*B, ...] tensor alive).
    ``embedding`` ([B, pos, d_model]) is added to every window when it is kept out of the sequence of
    outputs (``include_embedding=False``), else None.
    """

    def __init__(self, ks: list[int], batch: int, embedding: Optional[torch.Tensor], unit: str, per_layer: int):
        self.ks = ks
        self.batch = batch
        self.embedding = embedding
        self.unit = unit
        self.per_layer = per_layer
        # outputs a window of copy c spans at most (+1: a parallel MLP reads behind its own attention)
        self.reach = [(k if unit == "sublayer" else per_layer * k + 1) + 1 for k in ks]
        self.outputs: list[dict[int, torch.Tensor]] = [{} for _ in ks]

    def pusher(self, index: int):
        def hook_fn(x: torch.Tensor, hook) -> None:
            for copy, reach in enumerate(self.reach):
                kept = self.outputs[copy]
                kept[index] = self._rows(x, copy).clone()
                for old in [j for j in kept if j <= index - reach]:
                    del kept[old]

        return hook_fn

    def window_sum(self, outputs: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Sum of ``outputs`` in order (plus the embedding), accumulated in >= float32."""
        total = outputs[0].to(torch.promote_types(dtype, torch.float32), copy=True)
        for output in outputs[1:]:
            total += output
        if self.embedding is not None:
            total += self.embedding
        return total.to(dtype)

    def replace(self, x: torch.Tensor, reader: _Reader,
                clean: Optional[dict[int, torch.Tensor]]) -> Optional[torch.Tensor]:
        """x with the rows of every copy whose horizon windows ``reader`` replaced by its window (from
        ``clean`` outputs, else the pass's own); None (keep x) when no copy is windowed."""
        spans = [reader.span(k, self.unit, self.per_layer) for k in self.ks]
        if all(span is None for span in spans):
            return None
        pieces = []
        for copy, span in enumerate(spans):
            if span is None:
                pieces.append(self._rows(x, copy))
                continue
            source = clean if clean is not None else self.outputs[copy]
            pieces.append(self.window_sum([source[j] for j in range(*span)], x.dtype))
        return torch.cat(pieces, dim=0)

    def _rows(self, x: torch.Tensor, copy: int) -> torch.Tensor:
        return x[copy * self.batch : (copy + 1) * self.batch]


def _token_losses(logits: torch.Tensor, tokens: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits[:, p] against tokens[:, p+1] at the scored predictions, row-major (1-D)."""
    # every position against the next token (the last one against nothing): no copy of the logits
    targets = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -100)], dim=1)
    per_token = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none", ignore_index=-100)
    return per_token.view(tokens.shape)[:, :-1][scored]


def _exponential_fit(ks: torch.Tensor, increase: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares fit of log(increase) = log(A) - k / tau over the positive increases."""
    positive = increase > 0
    x, y = ks[positive], increase[positive].log()
    nan = torch.tensor(math.nan, dtype=torch.float64)
    if len(x) < 2 or bool((x == x[0]).all()):
        return nan, nan
    slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    intercept = y.mean() - slope * x.mean()
    tau = -1.0 / slope if slope != 0 else torch.tensor(math.inf, dtype=torch.float64)
    return intercept.exp(), tau
