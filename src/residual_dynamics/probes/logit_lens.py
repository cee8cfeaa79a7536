"""Logit lens: the loss, and the KL divergence to the model's own prediction, of every layer's residual
stream decoded as if it were the last.

Motivation (reader comments on "Residual stream norms grow exponentially over the forward pass", the
"circuit economics" comment): "there are different types of 'goods' in the transformer economy: those
which directly lead to better predictions and those which are useful for making better predictions when
integrated with other features. The success of Logit Lens seems to suggest that the latter category
increases over the course of the layers." Decoding each layer's stream through the final norm and the
unembedding separates the layers whose stream is already a "final good" (a good prediction) from the
rest; at checkpoints it gives a layer x step heatmap.

Definition. For every layer ``l`` the stream ``x_l = blocks.{l}.hook_resid_post`` is decoded with the
model's own final norm and unembedding (the norm recomputed on ``x_l``, as nostalgebraist's logit lens
does, not frozen at the final stream's scale):

    logits_l = unembed(ln_final(x_l)),   log q_l = log_softmax(logits_l),   log p = log_softmax(logits)

where ``logits`` are the model's logits. Over the scored predictions -- positions ``p >= 1`` with ``p``
and ``p + 1`` real tokens (position 0 and padding excluded, as in ``position_mask``), the prediction at
``p`` scored against token ``p + 1`` --

    loss[l] = mean over scored (b, p) of  -log q_l[b, p, tokens[b, p + 1]]
    kl[l]   = mean over scored (b, p) of  sum_v p[b, p, v] (log p[b, p, v] - log q_l[b, p, v])
    loss_final = the same loss of the model's own logits

``kl`` is KL(final || lens), the direction of the tuned-lens paper ("Eliciting Latent Predictions from
Transformers with the Tuned Lens"). The last layer decodes to the model's own logits (kl = 0 there).

Cost and memory: per chunk of batch rows, one plain forward for the final distribution, then one
forward that stops after the last block with a hook on every ``resid_post`` that decodes it and reduces
it to two sums on the device at once: at most one [rows, pos, d_vocab] decoding (plus the final
log-probabilities and probabilities of the rows' scored predictions) is alive at any time, never
[layers, batch, pos, d_vocab]. The rows per chunk are the most whose estimate (:func:`plan_rows`) fits
``max_memory``; the sums are float64, so every chunking gives the same means (up to the float32 rounding
of forwards over a different number of rows). A budget too small for one
row gives an :class:`Unsupported` result with a note.

Records: ``logit_lens/loss`` and ``logit_lens/kl`` per layer, ``logit_lens/loss_final``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from residual_dynamics.probes.arch import Arch
from residual_dynamics.probes.forward import pattern_release_hooks
from residual_dynamics.probes.common import (
    PLANNED_SHARE,
    Record,
    check_max_memory,
    does_not_fit,
    forward_bytes_per_row,
    memory_budget,
    position_mask,
    raise_if_unsupported,
)

# [pos, d_vocab] float32 tensors per row beyond the forward's own: the final log-probabilities and
# probabilities (kept), one layer's decoded logits, their scored copy and its log-softmax
_VOCAB_COPIES = 5


@dataclass
class Options:
    """The keyword options of :func:`logit_lens` (the ``probes.logit_lens`` config section).

    max_memory: memory budget of the probe (e.g. "2GB"); sets the batch rows per chunk; null =
                ``probes.max_memory``.
    """

    max_memory: Optional[str] = None

    def check(self, arch: Arch) -> None:
        """Raise ConfigError(<option>, message) for a bad value; runs no probe."""
        check_max_memory(self.max_memory)


def unsupported(arch: Arch) -> Optional[str]:
    """Why :func:`logit_lens` cannot run on ``arch``, or None."""
    missing = arch.missing("resid_post", "ln_final_in", "unembed_in")
    if missing:
        return f"logit_lens: the bridge has no hook points {missing}"
    return None


@dataclass
class LogitLens:
    """Result of :func:`logit_lens` (host tensors, float64).

    loss:       [n_layers] next-token loss of each layer's decoded resid_post.
    kl:         [n_layers] KL(final distribution || decoded distribution), nats.
    loss_final: [] the model's own loss on the same predictions.
    n_scored:   number of scored predictions the means are over.
    """

    loss: torch.Tensor
    kl: torch.Tensor
    loss_final: torch.Tensor
    n_scored: int

    def records(self) -> list[Record]:
        rows = [Record("logit_lens/loss", float(v), layer=layer) for layer, v in enumerate(self.loss.tolist())]
        rows += [Record("logit_lens/kl", float(v), layer=layer) for layer, v in enumerate(self.kl.tolist())]
        rows.append(Record("logit_lens/loss_final", float(self.loss_final)))
        return rows


# --- pieces shared with the sublayer-ablation probe ----------------------------------------------------


def scored_predictions(tokens: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[batch, pos - 1] bool: the prediction at p (for token p + 1) is scored iff p >= 1 and p, p + 1 are
    real tokens (``position_mask`` on both)."""
    mask = position_mask(tokens, attention_mask)
    scored = mask[:, :-1] & mask[:, 1:]
    if not scored.any():
        raise ValueError("no scored predictions (p >= 1 with p and p + 1 real): use sequences of length >= 3")
    return scored


def decode(bridge, resid: torch.Tensor) -> torch.Tensor:
    """Logits of residual vectors ``resid`` [..., pos, d_model] through the model's own final norm and
    unembedding (the norm's statistics computed on ``resid``)."""
    return bridge.unembed(bridge.ln_final(resid))


def scored_log_probs(logits: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """[M, d_vocab] float32 (or wider) log-probabilities of the scored predictions."""
    logits = logits[:, :-1][scored.to(logits.device)]
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def targets_of(tokens: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """[M] the next tokens of the scored predictions."""
    return tokens[:, 1:][scored]


def loss_of(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean of -log_probs[i, targets[i]]."""
    return -log_probs.gather(-1, targets.to(log_probs.device)[:, None]).mean()


def stop_forward(activation: torch.Tensor) -> None:
    """End a hooked forward here (TransformerLens' StopAtLayerException; the bridge catches it)."""
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    raise StopAtLayerException(activation)


def plan_rows(arch: Arch, *, batch: int, seq: int, d_vocab: int, budget: int) -> tuple[int, int]:
    """(batch rows per chunk within ``budget`` bytes, 0 when not even one row fits; bytes of one row):
    per row one forward's working set with its logits (:func:`forward_bytes_per_row`) and
    ``_VOCAB_COPIES`` [pos, d_vocab] float32 tensors, within 85% of the budget."""
    per_row = forward_bytes_per_row(seq=seq, d_model=arch.d_model, d_mlp=arch.d_mlp, n_heads=arch.n_heads,
                                    d_vocab=d_vocab) + 4 * _VOCAB_COPIES * seq * d_vocab
    return min(batch, int(PLANNED_SHARE * budget) // per_row), per_row


# --- the probe -------------------------------------------------------------------------------------------


@torch.no_grad()
def logit_lens(
    bridge,
    tokens: torch.Tensor,
    *,
    max_memory: Optional[str] = None,
    attention_mask: Optional[torch.Tensor] = None,
    arch: Optional[Arch] = None,
):
    """Loss and KL to the final distribution of every layer's resid_post decoded through the final norm
    and the unembedding; see the module doc.

    tokens:         [batch, pos] token ids.
    max_memory:     memory budget (bytes or e.g. "2GB"; default ``DEFAULT_MAX_MEMORY``): sets the rows per
                    chunk (:func:`plan_rows`); too small for one row -> an :class:`Unsupported` with a note.
    attention_mask: optional [batch, pos], 1 = real token (padding on the right); passed to the forwards.
    arch:           the model's :class:`~residual_dynamics.probes.arch.Arch` (built from the bridge if not
                    given). Raises ProbeUnsupported when the bridge lacks the hooks (:func:`unsupported`).
    """
    arch = Arch.of(bridge) if arch is None else arch
    raise_if_unsupported(unsupported(arch))
    budget = memory_budget(max_memory)
    rows, per_row = plan_rows(arch, batch=tokens.shape[0], seq=tokens.shape[1], d_vocab=int(bridge.cfg.d_vocab),
                              budget=budget)
    if rows < 1:
        return does_not_fit("logit_lens", int(per_row / PLANNED_SHARE), budget,
                            "raise probes.max_memory or use shorter prompts")
    return logit_lens_with_rows(bridge, tokens, rows, attention_mask=attention_mask, arch=arch)


@torch.no_grad()
def logit_lens_with_rows(bridge, tokens: torch.Tensor, rows: int, *, attention_mask: Optional[torch.Tensor] = None,
                         arch: Optional[Arch] = None) -> LogitLens:
    """:func:`logit_lens` over chunks of ``rows`` batch rows (any chunking, e.g. to check that it changes
    nothing); no memory check."""
    arch = Arch.of(bridge) if arch is None else arch
    raise_if_unsupported(unsupported(arch))
    scored = scored_predictions(tokens, attention_mask)
    count = arch.n_layers
    loss_sum = torch.zeros(count, dtype=torch.float64, device=tokens.device)
    kl_sum = torch.zeros(count, dtype=torch.float64, device=tokens.device)
    final_sum = torch.zeros((), dtype=torch.float64, device=tokens.device)
    has_scored = scored.any(1).cpu()
    for start in range(0, tokens.shape[0], rows):
        chunk = slice(start, start + rows)
        if not bool(has_scored[chunk].any()):
            continue
        mask = None if attention_mask is None else attention_mask[chunk]
        _lens_sums(bridge, arch, tokens[chunk], scored[chunk], mask, loss_sum, kl_sum, final_sum)
    n_scored = int(scored.sum())
    return LogitLens(
        loss=(loss_sum / n_scored).cpu(),
        kl=(kl_sum / n_scored).cpu(),
        loss_final=(final_sum / n_scored).cpu(),
        n_scored=n_scored,
    )


def _lens_sums(bridge, arch: Arch, tokens, scored, attention_mask, loss_sum, kl_sum, final_sum) -> None:
    """Add the summed losses and KLs of these rows' scored predictions to the float64 accumulators."""
    targets = targets_of(tokens, scored)
    forward_kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    logits = bridge.run_with_hooks(tokens, fwd_hooks=pattern_release_hooks(bridge, arch), **forward_kwargs)
    final = scored_log_probs(logits, scored)  # [M, d_vocab]
    del logits
    final_probs = final.exp()
    # KL(p || q) = sum_v p log p - sum_v p log q; the first part once per prediction
    neg_entropy = torch.einsum("mv,mv->m", final_probs, final)
    final_sum += -final.gather(-1, targets[:, None]).double().sum()
    count = arch.n_layers
    fired = [False] * count

    def lens(layer: int):
        def hook_fn(resid: torch.Tensor, hook) -> None:
            log_q = scored_log_probs(decode(bridge, resid), scored)
            loss_sum[layer] += -log_q.gather(-1, targets.to(log_q.device)[:, None]).double().sum()
            kl_sum[layer] += (neg_entropy - torch.einsum("mv,mv->m", final_probs, log_q)).double().sum()
            fired[layer] = True
            del log_q
            if layer == count - 1:
                stop_forward(resid)

        return hook_fn

    hooks = [(arch.hook("resid_post", layer), lens(layer)) for layer in range(count)]
    bridge.run_with_hooks(tokens, fwd_hooks=hooks + pattern_release_hooks(bridge, arch), return_type=None,
                          **forward_kwargs)
    missing = [layer for layer in range(count) if not fired[layer]]
    if missing:
        raise RuntimeError(f"logit_lens: the resid_post hooks of layers {missing} never fired")
