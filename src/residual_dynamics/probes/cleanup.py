"""Clean-up: nodes whose output direction is written to the residual stream and later removed.

Source: "Clean-up behavior in gelu-4l" (ARENA 2.0 / SERI MATS 2023), which finds head L0H2 of gelu-4l
written at resid_mid_0 (projection ratio ~1) and removed by heads L2H2..L2H7 (summed projection ratio
median ~ -0.9), making its direct logit attribution misleading.

Nodes and their outputs b (at every position):
    ``EMBED``   token embedding (``hook_embed``)
    ``POS``     positional embedding (``hook_pos_embed``), only for standard positional embeddings
    ``L{l}H{h}`` attention head h of layer l: z_h W_O,h, WITHOUT the layer's b_O (``attn.hook_z`` and
                 ``blocks[l].attn.W_O``); GQA heads are query heads
    ``L{l}MLP``  MLP of layer l (``hook_mlp_out``, bias included)
Each node has a sublayer index in forward order (embeddings -1, attn_l and mlp_l as in the layer
horizon probe); node n is LATER than writer w when its sublayer index is larger (other heads of the
writer's own layer are not later).

Residual points, in forward order: ``resid_pre_0``, then ``resid_mid_l`` (models with MLPs) and
``resid_post_l`` for every layer (``resid_pre_{l+1}`` equals ``resid_post_l`` and is not repeated).
A node with sublayer index s writes just before point s + 1.

Projection ratio (per position):  PR(a, b) = a . b / |b|^2, NaN where |b| = 0. For every writer w this
probe reports PR(resid at each point, b_w) and PR(b_n, b_w) for every node n, summarised by the 25th,
50th and 75th percentiles over the positions kept by :func:`position_mask` (NaNs ignored).

Scan. With m(p) the median PR of resid point p onto w, and p_w the point right after w writes:
    peak_pr       = max of m(p) over p >= p_w (at point p_peak)
    writer_score  = peak_pr - min of m(p) over p > p_peak  (how much of the written direction is
                    removed later, in units of the writer's own output; 0 if nothing comes after,
                    NaN if the writer's output is 0 at every kept position)
    cleaned       = peak_pr >= writer_min and some m(p) < threshold for p > p_peak;
                    cleaned_at = the first such p (else -1)
    cleaners      = the (at most ``top_n``) later nodes with negative median PR onto w, most negative
                    first; cleaner_pr_sum = percentiles of the per-position SUM of their PRs.
Cleaned writers are ranked by writer_score (``ranking``).

Direct logit attribution (DLA). At each position, t1 and t2 are the model's own top-2 predictions
(clean run) and u = W_U[:, t1] - W_U[:, t2]. The final norm is frozen at its clean-run scale s (the
``ln_final.hook_scale`` value; 1 for models without a final norm), so its action on a component c is
the linear map  c -> g * C(c) / s  with g its gain (1 + weight for offset norms, 1 if param-free) and C
mean-centering for LayerNorm (identity for RMSNorm). Then  DLA_n = (g * C(b_n) / s) . u,  and the sum of
the DLAs of all nodes plus the biases and the norm's bias equals the logit difference exactly.
``dla_corr`` is the Pearson correlation over positions between DLA_w and the sum of the DLAs of w's
cleaners (NaN without cleaners or variance).

Memory: the per-position PR tables are [writers, points + nodes, positions]; restrict ``writers`` on
big models. The probe runs two forward passes: the first records the writers' outputs, the DLA
direction and the final-norm scale; the second computes every PR and DLA in the hooks.

Records (node suffix: heads have layer and head, ``/mlp`` has layer, ``/embed`` and ``/pos`` neither):
    ``cleanup/n_cleaned``                     number of cleaned writers
    ``cleanup/writer_score[/mlp|/embed|/pos]`` every writer
    ``cleanup/top_cleaner_pr[...]``           cleaned writers: median PR of the first cleaner
    ``cleanup/cleaner_pr_sum[...]``           cleaned writers: median of the summed cleaner PR
    ``cleanup/dla_corr[...]``                 cleaned writers: writer vs cleaners DLA correlation
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from residual_dynamics.errors import ConfigError
from residual_dynamics.probes.arch import Arch
from residual_dynamics.probes.common import (
    Record,
    check_int,
    check_number,
    is_sequence,
    position_mask,
    raise_if_unsupported,
)

QUANTILES = (0.25, 0.5, 0.75)


@dataclass
class Options:
    """The keyword options of :func:`cleanup` (the ``probes.cleanup`` config section); see the module doc.

    threshold:  a writer is cleaned when a later median PR drops below this (< writer_min).
    writer_min: ... and its peak median PR is at least this (> 0).
    top_n:      most cleaners kept per writer (>= 1).
    writers:    node names to treat as writers (``EMBED``, ``POS``, ``L{l}H{h}``, ``L{l}MLP``); null = all.
    """

    threshold: float = 0.3
    writer_min: float = 0.7
    top_n: int = 8
    writers: Optional[List[str]] = None

    def check(self, arch: Arch) -> None:
        """Raise ConfigError(<option>, message) for a bad value; runs no probe."""
        threshold = check_number(self.threshold, "threshold")
        writer_min = check_number(self.writer_min, "writer_min")
        if writer_min <= 0:
            raise ConfigError("writer_min", f"must be > 0 (a peak projection ratio), got {self.writer_min!r}")
        if threshold >= writer_min:
            raise ConfigError("threshold", f"must be < writer_min={self.writer_min!r}, got {self.threshold!r}")
        check_int(self.top_n, "top_n", minimum=1)
        if self.writers is not None:
            if not is_sequence(self.writers) or not len(self.writers):
                raise ConfigError("writers", f"must be a non-empty list of node names or null, got {self.writers!r}")
            bad = [name for name in self.writers if not isinstance(name, str)]
            if bad:
                raise ConfigError("writers", f"must be node names (strings), got {bad[0]!r}")
            if arch.known:
                names = [node.name for node in nodes_of(arch)]
                unknown = [name for name in self.writers if name not in names]
                if unknown:
                    raise ConfigError("writers", f"unknown nodes {unknown}; this model's nodes: EMBED, "
                                                 f"{'POS, ' if arch.has_pos_embed else ''}L<layer>H<head> "
                                                 f"(layer < {arch.n_layers}, head < {arch.n_heads})"
                                                 f"{', L<layer>MLP' if arch.has_mlp else ''}")


def unsupported(arch: Arch) -> Optional[str]:
    """Why :func:`cleanup` cannot run on ``arch``, or None."""
    if arch.parallel:
        return ("cleanup: parallel attention + MLP blocks (GPT-NeoX / Pythia, GPT-J) have no resid_mid point, "
                "which the forward-order scan needs; not supported yet")
    kinds = ["embed", "z", "resid_pre", "resid_post"] + (["pos_embed"] if arch.has_pos_embed else [])
    kinds += ["mlp_out", "resid_mid"] if arch.has_mlp else []
    missing = arch.missing(*kinds)
    if missing:
        return f"cleanup: the bridge has no hook points {missing}"
    return None


@dataclass(frozen=True)
class Node:
    """A node that writes to the residual stream (see the module doc for names and ``sublayer``)."""

    name: str
    layer: Optional[int]
    head: Optional[int]
    sublayer: int

    def record(self, metric: str, value: float) -> Record:
        """``cleanup/<metric>`` for a head (layer, head), ``.../mlp`` (layer), ``.../embed`` or ``.../pos``."""
        suffix = {"EMBED": "/embed", "POS": "/pos"}.get(self.name, "/mlp" if self.head is None else "")
        return Record(f"cleanup/{metric}{suffix}", float(value), layer=self.layer, head=self.head)


@dataclass
class CleanupResult:
    """Clean-up tables (host tensors). N nodes, W writers, P residual points, percentiles (25, 50, 75).

    nodes, point_names: the nodes and residual points, in forward order.
    writers:        [W] int64 indices into ``nodes``.
    resid_pr:       [W, P, 3] PR(resid at point, writer output) percentiles.
    node_pr:        [W, N, 3] PR(node output, writer output) percentiles (the writer onto itself is 1).
    dla:            [N, batch, pos] DLA of each node; NaN at positions excluded by position_mask.
    peak_pr, writer_score: [W]; cleaned: [W] bool; cleaned_at: [W] int64 point index or -1.
    ranking:        [R] int64 indices into ``writers`` of the cleaned writers, highest score first.
    cleaners:       [W, top_n] int64 node indices, most negative median PR first, -1 padded.
    cleaner_pr:     [W, top_n] median PR of each cleaner, NaN padded.
    cleaner_pr_sum: [W, 3] percentiles of the per-position sum of the cleaners' PRs (NaN if none).
    dla_corr:       [W] Pearson r between the writer's DLA and its cleaners' summed DLA.
    """

    nodes: list[Node]
    point_names: list[str]
    writers: torch.Tensor
    resid_pr: torch.Tensor
    node_pr: torch.Tensor
    dla: torch.Tensor
    peak_pr: torch.Tensor
    writer_score: torch.Tensor
    cleaned: torch.Tensor
    cleaned_at: torch.Tensor
    ranking: torch.Tensor
    cleaners: torch.Tensor
    cleaner_pr: torch.Tensor
    cleaner_pr_sum: torch.Tensor
    dla_corr: torch.Tensor

    def writer_index(self, name: str) -> int:
        """Row of writer ``name`` in the per-writer tables."""
        names = [self.nodes[i].name for i in self.writers.tolist()]
        if name not in names:
            raise KeyError(f"{name} is not a writer of this result (writers: {names})")
        return names.index(name)

    def cleaner_names(self, writer: str) -> list[str]:
        """Names of the cleaners of ``writer``, most negative median PR first."""
        return [self.nodes[i].name for i in self.cleaners[self.writer_index(writer)].tolist() if i >= 0]

    def records(self) -> list[Record]:
        rows = [Record("cleanup/n_cleaned", float(self.cleaned.sum()))]
        for w, node_index in enumerate(self.writers.tolist()):
            node = self.nodes[node_index]
            metrics = {"writer_score": self.writer_score[w]}
            if self.cleaned[w]:
                metrics["top_cleaner_pr"] = self.cleaner_pr[w, 0]
                metrics["cleaner_pr_sum"] = self.cleaner_pr_sum[w, 1]
                metrics["dla_corr"] = self.dla_corr[w]
            rows += [node.record(metric, value) for metric, value in metrics.items()]
        return rows


def nodes_of(arch: Arch) -> list[Node]:
    """EMBED, POS (standard positional embeddings only), then per layer its heads and its MLP."""
    nodes = [Node("EMBED", None, None, -1)]
    if arch.has_pos_embed:
        nodes.append(Node("POS", None, None, -1))
    for layer in range(arch.n_layers):
        attn = arch.sublayer_index("attn", layer)
        nodes += [Node(f"L{layer}H{h}", layer, h, attn) for h in range(arch.n_heads)]
        if arch.has_mlp:
            nodes.append(Node(f"L{layer}MLP", layer, None, arch.sublayer_index("mlp", layer)))
    return nodes


def residual_points(arch: Arch) -> list[tuple[str, str]]:
    """(point name, hook name) in forward order; point p follows the sublayer with index p - 1."""
    return arch.residual_points()


def cleanup(
    bridge,
    tokens: torch.Tensor,
    *,
    threshold: float = 0.3,
    writer_min: float = 0.7,
    top_n: int = 8,
    writers: Optional[Sequence[str]] = None,
    attention_mask: Optional[torch.Tensor] = None,
    arch: Optional[Arch] = None,
) -> CleanupResult:
    """Projection-ratio tables, the clean-up scan and the DLA correlation; see the module doc.

    ``writers``: node names to treat as writers (default: every node). ``arch``: the model's
    :class:`~residual_dynamics.probes.arch.Arch` (built from the bridge if not given). Raises
    ProbeUnsupported on parallel blocks or missing hook points (:func:`unsupported`).
    """
    arch = Arch.of(bridge) if arch is None else arch
    raise_if_unsupported(unsupported(arch))
    nodes = nodes_of(arch)
    names = [node.name for node in nodes]
    writer_names = names if writers is None else list(writers)
    unknown = sorted(set(writer_names) - set(names))
    if unknown or not writer_names:
        raise ValueError(f"cleanup: writers must be a non-empty subset of {names}; unknown: {unknown}")
    writer_nodes = [names.index(name) for name in writer_names]
    points = residual_points(arch)
    mask = position_mask(tokens, attention_mask)
    forward_kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    n_heads = arch.n_heads

    def node_hooks(handle, wanted: Sequence[int]) -> list:
        """Hooks calling ``handle(first_node_index, outputs [M, n, d_model])`` at kept positions for
        every node group (one node, or all heads of a layer) that contains a node in ``wanted``."""

        def at(first: int, z_of_layer: Optional[int] = None):
            """Hook on one node's output, or on the z of every head of layer ``z_of_layer``."""

            def hook_fn(x: torch.Tensor, hook) -> None:
                kept = x[mask].float()
                if z_of_layer is None:
                    handle(first, kept[:, None])
                else:
                    w_o = bridge.blocks[z_of_layer].attn.W_O.float()  # [head, d_head, d_model]
                    handle(first, torch.einsum("mhd,hde->mhe", kept, w_o))

            return hook_fn

        hooks = []
        for index, node in enumerate(nodes):
            if node.head not in (None, 0):
                continue  # heads are handled as a group, at head 0
            group = range(index, index + (1 if node.head is None else n_heads))
            if not set(group) & set(wanted):
                continue
            if node.name == "EMBED":
                hooks.append((arch.hook("embed"), at(index)))
            elif node.name == "POS":
                hooks.append((arch.hook("pos_embed"), at(index)))
            elif node.head == 0:
                hooks.append((arch.hook("z", node.layer), at(index, z_of_layer=node.layer)))
            else:
                hooks.append((arch.hook("mlp_out", node.layer), at(index)))
        return hooks

    with torch.no_grad():
        # Pass 1: writer outputs, final-norm scale and the top-2 logit direction.
        outputs: dict[int, torch.Tensor] = {}

        def keep_writers(first: int, group: torch.Tensor) -> None:
            for offset in range(group.shape[1]):
                if first + offset in writer_nodes:
                    outputs[first + offset] = group[:, offset]

        scale: list[torch.Tensor] = []
        pass1 = node_hooks(keep_writers, writer_nodes)
        if arch.has("ln_final_scale"):
            pass1.append((arch.hook("ln_final_scale"), lambda x, hook: scale.append(x[mask].float())))
        logits = bridge.run_with_hooks(tokens, fwd_hooks=pass1, **forward_kwargs)
        missing = [names[i] for i in writer_nodes if i not in outputs]
        if missing:
            raise ValueError(f"cleanup: no output was recorded for nodes {missing}")
        direction = _dla_direction(bridge, logits[mask].float(), scale[0] if scale else None)
        del logits
        b = torch.stack([outputs[i] for i in writer_nodes])  # [W, M, d_model]
        b_norm2 = b.pow(2).sum(-1)
        b_norm2 = torch.where(b_norm2 > 0, b_norm2, torch.nan)

        # Pass 2: every PR onto the writers and every DLA, reduced in the hooks.
        n_kept = int(mask.sum())
        resid_values = torch.empty(len(writer_nodes), len(points), n_kept, device=b.device)
        node_values = torch.empty(len(writer_nodes), len(nodes), n_kept, device=b.device)
        dla_values = torch.empty(len(nodes), n_kept, device=b.device)

        def project(a: torch.Tensor) -> torch.Tensor:
            """PR of a [M, n, d] onto every writer: [W, n, M]."""
            return torch.einsum("mnd,wmd->wnm", a, b) / b_norm2[:, None]

        def on_nodes(first: int, group: torch.Tensor) -> None:
            node_values[:, first : first + group.shape[1]] = project(group)
            dla_values[first : first + group.shape[1]] = torch.einsum("mnd,md->nm", group, direction)

        def on_point(p: int):
            def hook_fn(x: torch.Tensor, hook) -> None:
                resid_values[:, p] = project(x[mask].float()[:, None])[:, 0]

            return hook_fn

        pass2 = node_hooks(on_nodes, range(len(nodes))) + [(hook, on_point(p)) for p, (_, hook) in enumerate(points)]
        bridge.run_with_hooks(tokens, fwd_hooks=pass2, **forward_kwargs)
        del b, outputs

        resid_pr = _nan_quantiles(resid_values)
        node_pr = _nan_quantiles(node_values)
        scan = _scan(nodes, writer_nodes, resid_pr[..., 1], node_pr[..., 1], threshold, writer_min, top_n)
        cleaner_sum = torch.full((len(writer_nodes), len(QUANTILES)), math.nan, device=node_pr.device)
        dla_corr = torch.full((len(writer_nodes),), math.nan, device=node_pr.device)
        for w, row in enumerate(scan["cleaners"]):
            chosen = row[row >= 0].to(node_values.device)
            if len(chosen):
                cleaner_sum[w] = _nan_quantiles(node_values[w, chosen].sum(0))
                dla_corr[w] = _pearson(dla_values[writer_nodes[w]], dla_values[chosen].sum(0))
        dla = torch.full((len(nodes), *tokens.shape), math.nan, device=dla_values.device)
        dla[:, mask] = dla_values

    return CleanupResult(
        nodes=nodes,
        point_names=[name for name, _ in points],
        writers=torch.tensor(writer_nodes, dtype=torch.int64),
        resid_pr=resid_pr.cpu(),
        node_pr=node_pr.cpu(),
        dla=dla.cpu(),
        cleaner_pr_sum=cleaner_sum.cpu(),
        dla_corr=dla_corr.cpu(),
        **{key: value.cpu() for key, value in scan.items()},
    )


def _dla_direction(bridge, logits: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """[M, d_model] vector whose dot product with a node output is its DLA (see the module doc)."""
    top2 = logits.topk(2, dim=-1).indices
    w_u = bridge.W_U.float()  # [d_model, d_vocab]
    direction = w_u[:, top2[:, 0]].T - w_u[:, top2[:, 1]].T
    norm = bridge.ln_final
    weight = getattr(norm, "weight", None) if hasattr(norm, "uses_rms_norm") else None
    if isinstance(weight, torch.Tensor):
        gain = 1.0 + weight.float() if getattr(norm, "uses_weight_offset", False) else weight.float()
        direction = direction * gain
    if hasattr(norm, "uses_rms_norm") and not norm.uses_rms_norm:
        # Centering is a symmetric projection: C(c) . v == c . C(v).
        direction = direction - direction.mean(-1, keepdim=True)
    if scale is not None:
        direction = direction / scale
    return direction


def _scan(nodes, writer_nodes, resid_median, node_median, threshold, writer_min, top_n) -> dict:
    """Writer scores, cleaned flags and cleaners from the median tables (see the module doc)."""
    n_writers = len(writer_nodes)
    peak_pr = torch.full((n_writers,), math.nan)
    score = torch.zeros(n_writers)
    cleaned = torch.zeros(n_writers, dtype=torch.bool)
    cleaned_at = torch.full((n_writers,), -1, dtype=torch.int64)
    cleaners = torch.full((n_writers, top_n), -1, dtype=torch.int64)
    cleaner_pr = torch.full((n_writers, top_n), math.nan)
    resid_median, node_median = resid_median.cpu(), node_median.cpu()
    sublayer = torch.tensor([node.sublayer for node in nodes])
    for w, node_index in enumerate(writer_nodes):
        written = nodes[node_index].sublayer + 1
        trace = resid_median[w, written:]
        if trace.isnan().all():  # the writer's output is zero at every position: PR undefined
            score[w] = math.nan
        else:
            peak = int(trace.nan_to_num(nan=-math.inf).argmax())
            peak_pr[w] = trace[peak]
            after = resid_median[w, written + peak + 1 :]
            if not after.isnan().all():
                score[w] = peak_pr[w] - after.nan_to_num(nan=math.inf).min()
            below = (after < threshold).nonzero()
            if bool(peak_pr[w] >= writer_min) and len(below):
                cleaned[w] = True
                cleaned_at[w] = written + peak + 1 + int(below[0, 0])
        candidates = ((sublayer > nodes[node_index].sublayer) & (node_median[w] < 0)).nonzero()[:, 0]
        order = node_median[w, candidates].argsort()[:top_n]
        cleaners[w, : len(order)] = candidates[order]
        cleaner_pr[w, : len(order)] = node_median[w, candidates[order]]
    ranked = cleaned.nonzero()[:, 0]
    ranking = ranked[score[ranked].argsort(descending=True, stable=True)]
    return {
        "peak_pr": peak_pr,
        "writer_score": score,
        "cleaned": cleaned,
        "cleaned_at": cleaned_at,
        "ranking": ranking,
        "cleaners": cleaners,
        "cleaner_pr": cleaner_pr,
    }


def _nan_quantiles(values: torch.Tensor) -> torch.Tensor:
    """QUANTILES of the last dimension ignoring NaNs (linear interpolation, as numpy); [..., 3].

    Sort-based rather than torch.nanquantile, which refuses inputs above 16M elements.
    """
    ordered = values.sort(dim=-1).values  # NaNs sort last
    count = (~values.isnan()).sum(-1, keepdim=True)
    result = []
    for q in QUANTILES:
        rank = (count - 1).clamp(min=0) * q
        low, high = rank.floor().long(), rank.ceil().long()
        frac = rank - low
        value = ordered.gather(-1, low) * (1 - frac) + ordered.gather(-1, high) * frac
        result.append(torch.where(count > 0, value, torch.nan))
    return torch.cat(result, dim=-1)


def _pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of two 1-D tensors (NaN if either is constant)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = (x.pow(2).sum() * y.pow(2).sum()).sqrt()
    return (x * y).sum() / denominator if denominator > 0 else torch.tensor(math.nan, dtype=torch.float64)
