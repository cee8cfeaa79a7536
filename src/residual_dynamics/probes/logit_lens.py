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

Cost and memory: one plain forward for the final distribution, then one forward that stops after the
last block with a hook on every ``resid_post`` that decodes it and reduces it to two scalars on the
device at once: at most one [batch, pos, d_vocab] tensor (plus the final log-probabilities at the scored
positions) is alive at any time, never [layers, batch, pos, d_vocab].

Records: ``logit_lens/loss`` and ``logit_lens/kl`` per layer, ``logit_lens/loss_final``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from residual_dynamics.probes.arch import Arch
from residual_dynamics.probes.common import Record, position_mask, raise_if_unsupported


@dataclass
class Options:
    """The keyword options of :func:`logit_lens` (the ``probes.logit_lens`` config section): none; the
    section has only ``enabled`` / ``early``."""

    def check(self, arch: Arch) -> None:
        """Nothing to check (no options)."""


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


# --- the probe -------------------------------------------------------------------------------------------


@torch.no_grad()
def logit_lens(
    bridge,
    tokens: torch.Tensor,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    arch: Optional[Arch] = None,
) -> LogitLens:
    """Loss and KL to the final distribution of every layer's resid_post decoded through the final norm
    and the unembedding; see the module doc.

    tokens:         [batch, pos] token ids.
    attention_mask: optional [batch, pos], 1 = real token (padding on the right); passed to the forwards.
    arch:           the model's :class:`~residual_dynamics.probes.arch.Arch` (built from the bridge if not
                    given). Raises ProbeUnsupported when the bridge lacks the hooks (:func:`unsupported`).
    """
    arch = Arch.of(bridge) if arch is None else arch
    raise_if_unsupported(unsupported(arch))
    scored = scored_predictions(tokens, attention_mask)
    targets = targets_of(tokens, scored)
    forward_kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}

    final = scored_log_probs(bridge(tokens, **forward_kwargs), scored)
    final_probs = final.exp()
    loss_final = loss_of(final, targets)
    count = arch.n_layers
    losses: list[Optional[torch.Tensor]] = [None] * count
    kls: list[Optional[torch.Tensor]] = [None] * count

    def lens(layer: int):
        def hook_fn(resid: torch.Tensor, hook) -> None:
            log_q = scored_log_probs(decode(bridge, resid), scored)
            losses[layer] = loss_of(log_q, targets)
            kls[layer] = (final_probs * (final - log_q)).sum(-1).mean()
            del log_q
            if layer == count - 1:
                stop_forward(resid)

        return hook_fn

    hooks = [(arch.hook("resid_post", layer), lens(layer)) for layer in range(count)]
    bridge.run_with_hooks(tokens, fwd_hooks=hooks, return_type=None, **forward_kwargs)
    missing = [layer for layer in range(count) if losses[layer] is None]
    if missing:
        raise RuntimeError(f"logit_lens: the resid_post hooks of layers {missing} never fired")
    return LogitLens(
        loss=torch.stack(losses).double().cpu(),
        kl=torch.stack(kls).double().cpu(),
        loss_final=loss_final.double().cpu(),
        n_scored=int(scored.sum()),
    )
