"""Effective layer horizon: how much loss rises when every reader only sees the last k sublayer outputs.

Definition (TurnTrout, "Effective layer horizon"; measured by Joseph Miller on GPT-2 small / XL).
Number the outputs written to the residual stream in forward order::

    o_{-1} = embedding (token + positional, i.e. ``blocks.0.hook_resid_pre``)
    o_0 = attn_0, o_1 = mlp_0, o_2 = attn_1, o_3 = mlp_1, ...      (attn-only models: o_l = attn_l)

so the usual input of sublayer s is ``o_{-1} + o_0 + ... + o_{s-1}``. For a horizon k, every reader
(sublayer s, or the final norm + unembedding when ``unembed_reads_window``) with at least k sublayers
before it reads, IN PLACE OF its usual residual input, the window of the k outputs just before it::

    include_embedding=True:   w_k(s) = o_{s-k} + ... + o_{s-1}
    include_embedding=False:  w_k(s) = o_{-1} + o_{s-k} + ... + o_{s-1}

Readers with fewer than k sublayers before them read their usual input. The residual stream itself is
untouched: each sublayer still adds its (now modified) output to it.

* ``include_embedding=True``: the embedding is output -1 of the sequence and is subject to the horizon
  like any sublayer output: it is in the window only while it is among the last k outputs, which for a
  windowed reader never happens (s >= k), so windowed readers do not see it.
* ``include_embedding=False``: the embedding is kept out of the sequence of outputs, so it never takes
  one of the k window slots and is never truncated: every windowed reader sees it next to its k
  sublayer outputs. (Leaving it out of the window without adding it back would give exactly the
  ``True`` numbers, since a window of k outputs before a reader with >= k sublayers behind it never
  reaches back to output -1.)
* ``unembed_reads_window=False``: the final norm + unembedding read the full residual stream of the
  modified pass. ``True``: they read the window sum of the last k outputs of the MODIFIED pass (the
  outputs the windowed sublayers actually produced; taking them from the clean run instead would make
  the loss independent of every sublayer edit), in both modes.
* ``mode="clean"`` (the definition): the o_j inside sublayer windows come from an unmodified run, so
  every sublayer sees a truncated clean stream. ``mode="same_pass"`` (Joseph Miller's forward pass):
  the o_j are the outputs of the modified forward pass itself, so truncation compounds.

Loss: mean next-token cross-entropy (nats) of the prediction at position p for token p+1, over
positions p >= 1 where both p and p+1 are real tokens (position 0 and padding are excluded, as in
:func:`position_mask`). ``loss_increase(k) = loss(k) - loss_clean``; the effective horizon is the
smallest k in ``ks`` with ``loss_increase(k) <= tolerance``; ``decay_amplitude`` A and ``decay_tau`` tau
fit ``loss_increase(k) ~= A exp(-k / tau)`` by least squares on ``log loss_increase`` over the positive
increases (NaN with fewer than two).

Cost: one clean forward on the probe batch, then hooked forwards on the batch repeated K times, chunk
c of the repeated batch enforcing horizon ``ks[c]`` (one forward for all K on accelerators; see
``max_batch``), so a sweep costs about K + 1 forward passes of the probe batch, not K x layers.
Sublayer inputs are replaced at ``blocks.{l}.ln1.hook_in`` / ``blocks.{l}.ln2.hook_in`` (the input of the
pre-norm, or of the identity slot where a model has no norm), which changes what the sublayer reads but
not the residual stream it adds to; the final norm reads through ``ln_final.hook_in``. Parallel
attention + MLP blocks have no sublayer order and are refused.

Records: ``horizon/loss_clean``; ``horizon/loss_increase/k{k:02d}`` per k (e.g. ``.../k03``; the k
is in the name because it is neither a layer nor a head); ``horizon/k_eff`` (-1 if no k reaches the
tolerance); ``horizon/decay_amplitude`` and ``horizon/decay_tau``. All have layer=None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Literal, Optional, Sequence

import torch
import torch.nn.functional as F

from residual_dynamics.errors import ConfigError
from residual_dynamics.probes.arch import Arch, Sublayer
from residual_dynamics.probes.common import (
    Record,
    check_bool,
    check_choice,
    check_int,
    check_int_list,
    check_number,
    position_mask,
    raise_if_unsupported,
)

Mode = Literal["clean", "same_pass"]
MODES = ("clean", "same_pass")


@dataclass
class Options:
    """The keyword options of :func:`layer_horizon` (the ``probes.layer_horizon`` config section); see
    the module doc.

    ks:                   horizons to sweep, integers in 1..n_sublayers; null = 1, 2, 4, ... (default_ks).
    mode:                 "clean" or "same_pass".
    include_embedding:    whether the embedding is output -1 of the sequence (True) or always seen (False).
    unembed_reads_window: whether the final norm + unembedding read the window too.
    tolerance:            loss increase (nats, > 0) within which a horizon counts as effective.
    max_batch:            most rows per hooked forward (>= 1); null = the default of :func:`layer_horizon`.
    """

    ks: Optional[List[int]] = None
    mode: str = "clean"
    include_embedding: bool = True
    unembed_reads_window: bool = False
    tolerance: float = 0.05
    max_batch: Optional[int] = None

    def check(self, arch: Arch) -> None:
        """Raise ConfigError(<option>, message) for a bad value; runs no probe."""
        if self.ks is not None:
            ks = check_int_list(self.ks, "ks")
            if not ks:
                raise ConfigError("ks", "must be a non-empty list of horizons, or null for the default")
            top = arch.n_sublayers if arch.known else None
            bad = [k for k in ks if k < 1 or (top is not None and k > top)]
            if bad:
                where = f"1..{top} (the model's number of sublayers)" if top is not None else ">= 1"
                raise ConfigError("ks", f"horizons must be integers in {where}, got {bad[0]!r} in {self.ks!r}")
        check_choice(self.mode, "mode", MODES)
        check_bool(self.include_embedding, "include_embedding")
        check_bool(self.unembed_reads_window, "unembed_reads_window")
        if check_number(self.tolerance, "tolerance") <= 0:
            raise ConfigError("tolerance", f"must be > 0, got {self.tolerance!r}")
        check_int(self.max_batch, "max_batch", minimum=1, optional=True)


def unsupported(arch: Arch) -> Optional[str]:
    """Why :func:`layer_horizon` cannot run on ``arch``, or None."""
    if arch.parallel:
        return ("layer_horizon: parallel attention + MLP blocks (GPT-NeoX / Pythia, GPT-J) read the same "
                "input, so there is no sublayer order to truncate")
    kinds = ["resid_pre", "ln_final_in", "ln1_in", "attn_out"] + (["ln2_in", "mlp_out"] if arch.has_mlp else [])
    missing = arch.missing(*kinds)
    if missing:
        return f"layer_horizon: the bridge has no hook points {missing}"
    return None


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

    def records(self) -> list[Record]:
        rows = [Record("horizon/loss_clean", float(self.loss_clean))]
        rows += [
            Record(f"horizon/loss_increase/k{int(k):02d}", float(increase))
            for k, increase in zip(self.ks, self.loss_increase)
        ]
        rows += [
            Record("horizon/k_eff", float(self.k_eff)),
            Record("horizon/decay_amplitude", float(self.decay_amplitude)),
            Record("horizon/decay_tau", float(self.decay_tau)),
        ]
        return rows


def sublayers(bridge, arch: Optional[Arch] = None) -> list[Sublayer]:
    """The sublayers in forward order (``arch.sublayers``: attn_0, mlp_0, attn_1, ...; attention-only
    models: attns only); raises ProbeUnsupported where the horizon cannot run (:func:`unsupported`)."""
    arch = Arch.of(bridge) if arch is None else arch
    raise_if_unsupported(unsupported(arch))
    return list(arch.sublayers)


def default_ks(n_sublayers: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to the number of sublayers."""
    return tuple(2**i for i in range(n_sublayers.bit_length()))


def layer_horizon(
    bridge,
    tokens: torch.Tensor,
    *,
    ks: Optional[Sequence[int]] = None,
    mode: Mode = "clean",
    include_embedding: bool = True,
    unembed_reads_window: bool = False,
    tolerance: float = 0.05,
    attention_mask: Optional[torch.Tensor] = None,
    max_batch: Optional[int] = None,
    arch: Optional[Arch] = None,
) -> HorizonResult:
    """Sweep the enforced layer horizon k over ``ks`` (default :func:`default_ks`); see the module doc.

    ``max_batch``: most rows per hooked forward; the K copies of the batch are grouped into forwards of
    ``max(1, max_batch // batch)`` copies (set it to bound memory on big models). Default: all K copies
    in one forward on an accelerator, one copy per forward on CPU, where a K-times larger batch runs
    slower per token (benchmarks/bench_horizon.py: ~1.15-1.25x the time of K + 1 plain forwards in
    one forward, ~1.03x in K). Either way the sweep costs K + 1 forward passes of the probe batch.
    ``arch``: the model's :class:`~residual_dynamics.probes.arch.Arch` (built from the bridge if not given).
    Raises ProbeUnsupported on parallel blocks or missing hook points (:func:`unsupported`).
    """
    if mode not in MODES:
        raise ValueError(f"layer_horizon: mode must be 'clean' or 'same_pass', got {mode!r}")
    arch = Arch.of(bridge) if arch is None else arch
    plan = sublayers(bridge, arch)
    ks = sorted(set(default_ks(len(plan)) if ks is None else (int(k) for k in ks)))
    if not ks or ks[0] < 1:
        raise ValueError(f"layer_horizon: ks must be positive integers, got {ks}")
    batch = tokens.shape[0]
    mask = position_mask(tokens, attention_mask)
    scored = mask[:, :-1] & mask[:, 1:]  # prediction at p scored iff p >= 1 and p, p+1 are real
    if not scored.any():
        raise ValueError("layer_horizon: no scored predictions; use sequences of length >= 3")
    forward_kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    if max_batch is None:
        max_batch = batch if tokens.device.type == "cpu" else batch * len(ks)
    copies_per_pass = max(1, max_batch // batch)

    with torch.no_grad():
        clean: dict[str, list[torch.Tensor]] = {"embedding": [], "outputs": []}

        def keep(key: str):
            return lambda x, hook: clean[key].append(x)

        keep_hooks = []
        if not include_embedding:
            keep_hooks.append((arch.hook("resid_pre", 0), keep("embedding")))
        if mode == "clean":
            keep_hooks += [(sub.output_hook, keep("outputs")) for sub in plan]
        logits = bridge.run_with_hooks(tokens, fwd_hooks=keep_hooks, **forward_kwargs)
        loss_clean = _next_token_loss(logits, tokens, scored)
        del logits
        embedding = clean["embedding"][0] if clean["embedding"] else None

        loss = torch.cat(
            [
                _windowed_losses(
                    bridge,
                    tokens,
                    _ChunkWindows(ks[start : start + copies_per_pass], batch, embedding),
                    plan,
                    arch.hook("ln_final_in"),
                    clean["outputs"] if mode == "clean" else None,
                    unembed_reads_window,
                    attention_mask,
                    scored,
                )
                for start in range(0, len(ks), copies_per_pass)
            ]
        )
        del clean, embedding

    loss, loss_clean = loss.double().cpu(), loss_clean.double().cpu()
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
    )


def _windowed_losses(
    bridge,
    tokens: torch.Tensor,
    windows: "_ChunkWindows",
    plan: list[Sublayer],
    final_hook: str,
    clean_outputs: Optional[list[torch.Tensor]],
    unembed_reads_window: bool,
    attention_mask: Optional[torch.Tensor],
    scored: torch.Tensor,
) -> torch.Tensor:
    """Loss of each chunk of ``windows`` from one hooked forward on the batch repeated per chunk.

    ``clean_outputs``: the clean run's sublayer outputs for the clean mode, None for the same pass.
    """

    def record(x: torch.Tensor, hook) -> None:
        windows.push(x)

    def read_clean_window(n_before: int):
        history = clean_outputs[:n_before]
        return lambda x, hook: windows.replace(
            x, lambda chunk, k: windows.window_of(history, k, x.dtype), n_before
        )

    def read_pass_window(x: torch.Tensor, hook) -> Optional[torch.Tensor]:
        return windows.replace(x, windows.window, windows.count)

    record_pass = clean_outputs is None or unembed_reads_window
    hooks = []
    for s, sub in enumerate(plan):
        hooks.append((sub.input_hook, read_pass_window if clean_outputs is None else read_clean_window(s)))
        if record_pass:
            hooks.append((sub.output_hook, record))
    if unembed_reads_window:
        hooks.append((final_hook, read_pass_window))

    copies = len(windows.ks)
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask.repeat(copies, 1)}
    logits = bridge.run_with_hooks(tokens.repeat(copies, 1), fwd_hooks=hooks, **kwargs)
    return torch.stack(
        [_next_token_loss(chunk, tokens, scored) for chunk in logits.split(tokens.shape[0], dim=0)]
    )


class _ChunkWindows:
    """Window sums for the repeated batch: chunk c (rows c*B .. c*B+B-1) enforces horizon ks[c].

    ``push`` records one sublayer output of the modified pass; each chunk keeps a private copy of only
    its last k rows (a view would keep the whole [K*B, ...] tensor alive for the chunk with the
    largest k). ``embedding`` ([B, pos, d_model]) is added to every window when it is kept out of the
    sequence of outputs (``include_embedding=False``), else None.
    """

    def __init__(self, ks: list[int], batch: int, embedding: Optional[torch.Tensor]):
        self.ks = ks
        self.batch = batch
        self.embedding = embedding
        self.recent: list[list[torch.Tensor]] = [[] for _ in ks]
        self.count = 0  # sublayer outputs pushed so far

    def push(self, x: torch.Tensor) -> None:
        for chunk, k in enumerate(self.ks):
            self.recent[chunk].append(self._rows(x, chunk).clone())
            del self.recent[chunk][:-k]
        self.count += 1

    def window(self, chunk: int, k: int) -> torch.Tensor:
        """Window of chunk ``chunk`` over the outputs pushed so far."""
        return self.window_of(self.recent[chunk], k, self.recent[chunk][0].dtype)

    def window_of(self, history: list[torch.Tensor], k: int, dtype: torch.dtype) -> torch.Tensor:
        """Sum of the last k tensors of ``history`` (plus the embedding), accumulated in >= float32."""
        total = history[-k].to(torch.promote_types(dtype, torch.float32), copy=True)
        for output in history[len(history) - k + 1 :]:
            total += output
        if self.embedding is not None:
            total += self.embedding
        return total.to(dtype)

    def replace(self, x: torch.Tensor, window, n_before: int) -> Optional[torch.Tensor]:
        """x with the rows of every chunk with k <= ``n_before`` (sublayers before the reader)
        replaced by ``window(chunk, k)``; None (keep x) when no chunk is windowed."""
        if n_before < self.ks[0]:
            return None
        pieces = [
            window(chunk, k) if n_before >= k else self._rows(x, chunk)
            for chunk, k in enumerate(self.ks)
        ]
        return torch.cat(pieces, dim=0)

    def _rows(self, x: torch.Tensor, chunk: int) -> torch.Tensor:
        return x[chunk * self.batch : (chunk + 1) * self.batch]


def _next_token_loss(logits: torch.Tensor, tokens: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits[:, p] against tokens[:, p+1] over the scored predictions."""
    per_token = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none"
    ).view(scored.shape)
    return per_token[scored].mean()


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
