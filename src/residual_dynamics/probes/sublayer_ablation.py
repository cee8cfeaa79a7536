"""Sublayer ablation: how much the loss rises when one sublayer's output is replaced by its mean, or by 0.

Motivation (reader comments on "Residual stream norms grow exponentially over the forward pass", the
"circuit economics" comment): "I'd predict that neural networks originally start by having valuable
circuits in many layers but then transition to maintain circuits earlier in the network which are
valuable to many downstream circuits and circuits later in the network which make the best use of
earlier circuits." The "usefulness" of a sublayer is measured here as the loss it saves: run at
checkpoints, the probe gives a layer x step heatmap of it.

Definition. Sublayers are numbered in forward order (attn_0, mlp_0, attn_1, ...; attention-only models:
attn_0, attn_1, ...; ``Arch.sublayers``); ``o_s`` is what sublayer s writes to the residual stream
(``hook_attn_out`` / ``hook_mlp_out``). The *real* positions R are those of ``position_mask`` (p >= 1,
not padding). Ablating s replaces ``o_s[b, p]`` at every (b, p) in R by

    mode="mean":  m_s = mean over (b', p') in R of the clean o_s[b', p']   (the probe batch's mean)
    mode="zero":  0

and leaves position 0 and padding as they are (the mean is taken over the positions it replaces; the
attention sink at position 0 keeps its clean value). Every later sublayer then reads the modified
stream. With ``loss`` the mean next-token cross-entropy (nats) over the scored predictions (p >= 1 with
p and p + 1 real; see ``logit_lens.scored_predictions``),

    loss_increase[s] = loss(s ablated) - loss(clean)

for every sublayer s, or, with ``layers``, for the sublayers of those layers only (the same numbers as in
the full sweep: every ablation is measured against the same clean run).

Batching: one clean forward (the loss and, for the mean mode, the means m_s, reduced on the device in
the hooks), then the batch repeated once per sublayer of a chunk, copy c ablating sublayer chunk[c]
through its own output hook; each copy's loss is computed in a hook on the last block's ``resid_post``
(decoded through the final norm and the unembedding one copy at a time, so no more than one
[batch, pos, d_vocab] tensor is alive), and the forward stops there. A chunk costs about one forward of
``len(chunk)`` times the batch; ``max_batch`` bounds the rows per forward (default: all sublayers in one
forward on an accelerator, one sublayer per forward on CPU, where a bigger batch is slower per token).
Memory: ``max_memory`` bounds the probe's own memory (:func:`plan_chunks`): the copies per forward, and the rows
decoded at a time (a [rows, pos, d_vocab] decoding with its log-softmax); losses are float64 sums over
those rows, so the chunking changes nothing but float32 rounding. A budget too small for one copy and one
decoded row gives an :class:`Unsupported` result with a note.

Records: ``ablation/loss_clean``; ``ablation/<mode>/attn`` and ``ablation/<mode>/mlp`` per layer (the
loss increase; the mode is in the name so that mean- and zero-ablation numbers never mix).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from residual_dynamics.errors import ConfigError
from residual_dynamics.probes.arch import Arch, Sublayer
from residual_dynamics.probes.forward import pattern_release_hooks
from residual_dynamics.probes.common import (
    PLANNED_SHARE,
    Record,
    check_choice,
    check_int,
    check_int_list,
    check_max_memory,
    does_not_fit,
    forward_bytes_per_row,
    memory_budget,
    position_mask,
    raise_if_unsupported,
)
from residual_dynamics.probes.logit_lens import (
    decode,
    scored_log_probs,
    scored_predictions,
    stop_forward,
    targets_of,
)

MODES = ("mean", "zero")


@dataclass
class Options:
    """The keyword options of :func:`sublayer_ablation` (the ``probes.sublayer_ablation`` section).

    mode:       "mean" (replace by the probe batch's mean over real positions) or "zero".
    layers:     ablate only the sublayers of these layers (distinct layer indices); null = every layer.
                Each ablated sublayer costs about one forward of the probe batch, so on deep models
                (GPT-2 XL: 96 sublayers) a few chosen layers are the affordable sweep.
    max_batch:  most rows per ablation forward (>= 1); null = the default of :func:`sublayer_ablation`.
    max_memory: memory budget of the probe (e.g. "2GB"); null = ``probes.max_memory``.
    """

    mode: str = "mean"
    layers: Optional[List[int]] = None
    max_batch: Optional[int] = None
    max_memory: Optional[str] = None

    def check(self, arch: Arch) -> None:
        """Raise ConfigError(<option>, message) for a bad value; runs no probe."""
        check_choice(self.mode, "mode", MODES)
        check_layers(self.layers, arch.n_layers if arch.known else None)
        check_int(self.max_batch, "max_batch", minimum=1, optional=True)
        check_max_memory(self.max_memory)


def check_layers(layers, n_layers: Optional[int]) -> None:
    """None, or a non-empty list of distinct layer indices, each below ``n_layers`` when it is known;
    ConfigError("layers", ...) otherwise."""
    if layers is None:
        return
    items = check_int_list(layers, "layers")
    if not items:
        raise ConfigError("layers", "must be a non-empty list of layer indices or null (every layer), got []")
    if len(set(items)) != len(items):
        raise ConfigError("layers", f"must not repeat a layer, got {list(layers)!r}")
    bad = [layer for layer in items if layer < 0 or (n_layers is not None and layer >= n_layers)]
    if bad:
        limit = f"0..{n_layers - 1} (the model has {n_layers} layers)" if n_layers is not None else ">= 0"
        raise ConfigError("layers", f"layer indices must be in {limit}, got {bad}")


_DECODE_COPIES = 3  # [pos, d_vocab] float32 tensors per decoded row: logits, their scored copy, log-softmax


def plan_chunks(arch: Arch, *, batch: int, seq: int, d_vocab: int, budget: int, copies: int) -> tuple[int, int, int]:
    """(copies of the batch per ablation forward, at most ``copies``; rows decoded at a time; bytes needed
    at the smallest chunk), with 0 copies when one copy and one decoded row do not fit 85% of ``budget``.
    Per copy: the batch's forward working set up to the last block (no logits, the forward stops there);
    per decoded row: ``_DECODE_COPIES`` [pos, d_vocab] float32 tensors. Up to half the budget goes to the
    decoding, the rest to the copies."""
    usable = int(PLANNED_SHARE * budget)
    copy_bytes = batch * forward_bytes_per_row(seq=seq, d_model=arch.d_model, d_mlp=arch.d_mlp, n_heads=arch.n_heads,
                                               d_vocab=d_vocab, logits=False)
    row_bytes = 4 * _DECODE_COPIES * seq * d_vocab
    smallest = int((copy_bytes + row_bytes) / PLANNED_SHARE) + 2  # the least budget whose 85% holds both
    if copy_bytes + row_bytes > usable:
        return 0, 0, smallest
    rows = max(1, min(batch, (usable // 2) // row_bytes, (usable - copy_bytes) // row_bytes))
    fit = max(1, (usable - rows * row_bytes) // copy_bytes)
    return int(min(copies, fit)), int(rows), smallest


def unsupported(arch: Arch) -> Optional[str]:
    """Why :func:`sublayer_ablation` cannot run on ``arch``, or None."""
    kinds = ["resid_post", "attn_out", "ln_final_in", "unembed_in"] + (["mlp_out"] if arch.has_mlp else [])
    missing = arch.missing(*kinds)
    if missing:
        return f"sublayer_ablation: the bridge has no hook points {missing}"
    return None


@dataclass
class SublayerAblation:
    """Result of :func:`sublayer_ablation` (host tensors, float64).

    kinds, layers:  the sublayers in forward order ("attn" / "mlp", and their block).
    loss:           [n_sublayers] loss with that sublayer ablated.
    loss_clean:     [] loss of the unmodified model on the same predictions.
    loss_increase:  [n_sublayers] loss - loss_clean.
    mode:           "mean" or "zero".
    """

    kinds: list[str]
    layers: list[int]
    loss: torch.Tensor
    loss_clean: torch.Tensor
    loss_increase: torch.Tensor
    mode: str

    def of(self, kind: str) -> torch.Tensor:
        """[n_layers] loss increase of the ``kind`` ("attn" / "mlp") sublayers, by layer."""
        return torch.stack([v for k, v in zip(self.kinds, self.loss_increase) if k == kind])

    def records(self) -> list[Record]:
        rows = [Record("ablation/loss_clean", float(self.loss_clean))]
        rows += [
            Record(f"ablation/{self.mode}/{kind}", float(increase), layer=layer)
            for kind, layer, increase in zip(self.kinds, self.layers, self.loss_increase.tolist())
        ]
        return rows


@torch.no_grad()
def sublayer_ablation(
    bridge,
    tokens: torch.Tensor,
    *,
    mode: str = "mean",
    layers: Optional[Sequence[int]] = None,
    max_batch: Optional[int] = None,
    max_memory: Optional[str] = None,
    attention_mask: Optional[torch.Tensor] = None,
    arch: Optional[Arch] = None,
):
    """Loss increase of mean- (or zero-) ablating each sublayer; see the module doc.

    tokens:         [batch, pos] token ids.
    mode:           "mean" or "zero".
    layers:         ablate only the sublayers of these layers; None = every layer (ConfigError naming
                    ``layers`` for a bad list).
    max_batch:      most rows per ablation forward: the sublayers are ablated ``max(1, max_batch // batch)``
                    at a time. Default: all at once on an accelerator, one at a time on CPU.
    max_memory:     memory budget (bytes or e.g. "2GB"; default ``DEFAULT_MAX_MEMORY``): caps the copies per
                    forward and sets the rows decoded at a time (:func:`plan_chunks`).
    attention_mask: optional [batch, pos], 1 = real token (padding on the right).
    arch:           the model's :class:`~residual_dynamics.probes.arch.Arch` (built from the bridge if not
                    given). Raises ProbeUnsupported when the bridge lacks the hooks (:func:`unsupported`).
    """
    if mode not in MODES:
        raise ValueError(f"sublayer_ablation: mode must be one of {MODES}, got {mode!r}")
    arch = Arch.of(bridge) if arch is None else arch
    raise_if_unsupported(unsupported(arch))
    check_layers(layers, arch.n_layers)
    chosen = None if layers is None else set(layers)
    plan = [sub for sub in arch.sublayers if chosen is None or sub.layer in chosen]
    batch = tokens.shape[0]
    real = position_mask(tokens, attention_mask)
    scored = scored_predictions(tokens, attention_mask)
    last_resid = arch.hook("resid_post", arch.n_layers - 1)
    if max_batch is None:
        max_batch = batch if tokens.device.type == "cpu" else batch * len(plan)
    budget = memory_budget(max_memory)
    per_forward, decode_rows, smallest = plan_chunks(arch, batch=batch, seq=tokens.shape[1],
                                               d_vocab=int(bridge.cfg.d_vocab), budget=budget,
                                               copies=max(1, max_batch // batch))
    if per_forward < 1:
        return does_not_fit("sublayer_ablation", smallest, budget, "raise probes.max_memory or use shorter prompts")
    n_scored = int(scored.sum())
    # the row chunks decoded at a time that hold a scored prediction, with their targets (made once)
    has_scored = scored.any(1).cpu()
    decode_chunks = [(rows, targets_of(tokens[rows], scored[rows]))
                     for rows in (slice(start, start + decode_rows) for start in range(0, batch, decode_rows))
                     if bool(has_scored[rows].any())]

    def summed_loss(resid: torch.Tensor) -> torch.Tensor:
        """Mean loss of the scored predictions decoded from ``resid`` [batch, pos, d_model], ``decode_rows``
        rows at a time (float64 sum)."""
        total = torch.zeros((), dtype=torch.float64, device=resid.device)
        for rows, targets in decode_chunks:
            log_q = scored_log_probs(decode(bridge, resid[rows]), scored[rows])
            total += -log_q.gather(-1, targets.to(log_q.device)[:, None]).double().sum()
        return total / n_scored

    # Clean pass: the loss (decoded at the last block, like the ablated copies) and the means.
    sums: dict[int, Optional[torch.Tensor]] = {sub.index: None for sub in plan}  # by Sublayer.index
    clean: list[torch.Tensor] = []

    def accumulate(index: int):
        def hook_fn(x: torch.Tensor, hook) -> None:
            sums[index] = x[real.to(x.device)].sum(0, dtype=torch.promote_types(x.dtype, torch.float32))

        return hook_fn

    def clean_loss(resid: torch.Tensor, hook) -> None:
        clean.append(summed_loss(resid))
        stop_forward(resid)

    hooks = [(sub.output_hook, accumulate(sub.index)) for sub in plan] if mode == "mean" else []
    hooks.append((last_resid, clean_loss))
    _run(bridge, tokens, hooks, attention_mask)
    if mode == "mean" and any(sums[sub.index] is None for sub in plan):
        missing = [sub.output_hook for sub in plan if sums[sub.index] is None]
        raise RuntimeError(f"sublayer_ablation: the output hooks {missing} never fired")
    n_real = int(real.sum())
    means = {index: None if total is None else total / n_real for index, total in sums.items()}

    losses = []
    for start in range(0, len(plan), per_forward):
        losses += _ablated_losses(bridge, tokens, plan[start : start + per_forward], means, real, summed_loss,
                                  last_resid, attention_mask)
    loss = torch.stack(losses).double().cpu()
    loss_clean = clean[0].double().cpu()
    return SublayerAblation(
        kinds=[sub.kind for sub in plan],
        layers=[sub.layer for sub in plan],
        loss=loss,
        loss_clean=loss_clean,
        loss_increase=loss - loss_clean,
        mode=mode,
    )


def _run(bridge, tokens: torch.Tensor, hooks: list, attention_mask: Optional[torch.Tensor]) -> None:
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    bridge.run_with_hooks(tokens, fwd_hooks=hooks + pattern_release_hooks(bridge), return_type=None, **kwargs)


def _ablated_losses(bridge, tokens: torch.Tensor, chunk: list[Sublayer], means: list, real: torch.Tensor,
                    summed_loss, last_resid: str, attention_mask: Optional[torch.Tensor]) -> list[torch.Tensor]:
    """Losses of one forward over ``len(chunk)`` copies of the batch, copy c ablating ``chunk[c]``."""
    batch = tokens.shape[0]
    losses: list[torch.Tensor] = []

    def ablate(copy: int, sub: Sublayer):
        def hook_fn(x: torch.Tensor, hook) -> torch.Tensor:
            rows = x[copy * batch : (copy + 1) * batch]
            where = real.to(x.device)[..., None]
            replacement = 0.0 if means[sub.index] is None else means[sub.index].to(x.dtype)
            x = x.clone()
            x[copy * batch : (copy + 1) * batch] = torch.where(where, replacement, rows)
            return x

        return hook_fn

    def copy_losses(resid: torch.Tensor, hook) -> None:
        for copy in range(len(chunk)):
            losses.append(summed_loss(resid[copy * batch : (copy + 1) * batch]))
        stop_forward(resid)

    hooks = [(sub.output_hook, ablate(copy, sub)) for copy, sub in enumerate(chunk)] + [(last_resid, copy_losses)]
    mask = None if attention_mask is None else attention_mask.repeat(len(chunk), 1)
    _run(bridge, tokens.repeat(len(chunk), 1), hooks, mask)
    if len(losses) != len(chunk):
        raise RuntimeError(f"sublayer_ablation: the hook on {last_resid} never fired")
    return losses
