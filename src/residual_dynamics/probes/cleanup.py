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
Each node has a write index (``Node.sublayer``, :meth:`Arch.write_index`): embeddings -1; attn_l and
mlp_l numbered in forward order as in the layer horizon probe; node n is LATER than writer w when its
write index is larger (other heads of the writer's own layer are not later).

Residual points, in forward order: ``resid_pre_0``, then ``resid_mid_l`` (models with MLPs) and
``resid_post_l`` for every layer (``resid_pre_{l+1}`` equals ``resid_post_l`` and is not repeated).
A node with write index s writes just before point s + 1.

Parallel blocks (GPT-NeoX / Pythia, GPT-J): attention and MLP of layer l read the same input and are
written at the same time, so both have write index l, the MLP of layer l is not later than its heads,
and clean-up is measured at ``resid_pre_0`` and ``resid_post_l`` only (there is no ``resid_mid``).

Projection ratio (per position):  PR(a, b) = a . b / |b|^2, NaN where |b| = 0. For every writer w this
probe reports PR(resid at each point, b_w) and PR(b_n, b_w) for every node n written at or after w (write
index >= w's: the writer itself, the other heads of its layer and every later node; NaN for the nodes
written before w, which cannot clean it up), summarised by the 25th, 50th and 75th percentiles over the
positions kept by :func:`position_mask` (NaNs ignored; exact, linear interpolation as numpy).

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

* ``dla_corr`` (the TOTAL attribution, the write-up's r = -0.159): the Pearson correlation over positions
  between DLA_w and the sum of the DLAs of w's cleaners (NaN without cleaners or variance).
* ``dla_corr_vcomp`` (the V-composition part, the write-up's headline r = -0.716): the Pearson
  correlation between DLA_w and the DLA of the part of the head cleaners' outputs that comes from
  V-composition with the writer. For a head cleaner c (layer l, head h) at query position p:
      v_c(p) = sum_i A_c(p, i) * (g1 * C(b_w(i)) / s1(i)) W_V,c W_O,c
  with A_c its clean-run attention pattern, and layer l's ln1 frozen at its scale s1 (``ln1.hook_scale``,
  gain g1 and centering as above; no biases). ``dla_vcomp`` = the DLA of the sum of v_c over w's head
  cleaners (MLP cleaners have no V-composition and add nothing; a writer without head cleaners gets 0
  and a NaN correlation).

Memory and cost. The forward runs over chunks of batch rows; the kept positions then go, in order, into
blocks of a few positions, where every node output is computed once from the recorded z (z W_O) and MLP
outputs and multiplied, position by position, with the outputs of the writers in one batched matrix
product per block of nodes, each writer only with the nodes it sees. A writer's PR table is [P + its
visible nodes, M] (M kept positions: 22 MB per early writer of GPT-2 XL at 32 x 128 tokens, 15 GB for all
of its 1250 writers). :func:`plan` picks the chunks within ``max_memory`` (the probe's own memory):

* the tables of every writer fit: ONE sweep over the positions fills them, from activations that ONE
  forward recorded (with the attention patterns when those fit too, else a second, shorter forward
  reads the patterns for the V-composition);
* they do not fit, with ``spill`` (the default) and the space for it (``plan`` checks): ONE forward
  records the activations of every row and ONE sweep fills every table, both kept outside the budget --
  in files in ``spill_dir`` (CPU; removed when the probe ends) or in host memory (GPU) -- the
  activations read back one chunk of rows at a time, the tables one writer at a time;
* otherwise the writers go in several passes, each sweeping the positions for its writers' tables, over
  activations recorded once when they fit, else over a forward of its own (the V-composition of one
  pass then rides on the next pass's forward, one extra forward after the last).

Quantiles are computed per writer from its complete table, so every number is the same as with no
chunking. A budget that fits not even one row, one position per block and one writer's table gives an
:class:`Unsupported` result with a note instead.

Records (node suffix: heads have layer and head, ``/mlp`` has layer, ``/embed`` and ``/pos`` neither):
    ``cleanup/n_cleaned``                     number of cleaned writers
    ``cleanup/writer_score[/mlp|/embed|/pos]`` every writer
    ``cleanup/top_cleaner_pr[...]``           cleaned writers: median PR of the first cleaner
    ``cleanup/cleaner_pr_sum[...]``           cleaned writers: median of the summed cleaner PR
    ``cleanup/dla_corr[...]``                 cleaned writers: writer vs cleaners' total DLA correlation
    ``cleanup/dla_corr_vcomp[...]``           cleaned writers: writer vs the V-composition part's DLA
"""

from __future__ import annotations

import bisect
import contextlib
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from residual_dynamics.errors import ConfigError
from residual_dynamics.probes.arch import Arch
from residual_dynamics.probes.forward import pattern_release_hooks, stop_forward_hook
from residual_dynamics.probes.common import (
    PLANNED_SHARE,
    Record,
    check_bool,
    check_int,
    check_max_memory,
    check_number,
    does_not_fit,
    forward_bytes_per_row,
    is_sequence,
    memory_budget,
    position_mask,
    raise_if_unsupported,
)

QUANTILES = (0.25, 0.5, 0.75)
_FLOAT = 4  # bytes per element of every table (float32)
_NODE_BLOCK = 128  # node outputs per batched product with the writers
_POSITIONS = (64, 32, 16, 8, 4, 2, 1)  # kept positions per block of products, largest that fits first
_VCOMP_BLOCK = 16  # writers of one cleaner head per V-composition product


@dataclass
class Options:
    """The keyword options of :func:`cleanup` (the ``probes.cleanup`` config section); see the module doc.

    threshold:  a writer is cleaned when a later median PR drops below this (< writer_min).
    writer_min: ... and its peak median PR is at least this (> 0).
    top_n:      most cleaners kept per writer (>= 1).
    writers:    node names to treat as writers (``EMBED``, ``POS``, ``L{l}H{h}``, ``L{l}MLP``); null = all.
    max_memory: memory budget of the probe (e.g. "2GB"); null = ``probes.max_memory``.
    spill:      when the tables of every writer do not fit ``max_memory``, record the activations once
                and keep them and the tables in files (CPU) or host memory (GPU), filled in one sweep,
                instead of several passes over the writers (see the module doc).
    spill_dir:  the directory of those files; null = the system's temporary directory.
    """

    threshold: float = 0.3
    writer_min: float = 0.7
    top_n: int = 8
    writers: Optional[List[str]] = None
    max_memory: Optional[str] = None
    spill: bool = True
    spill_dir: Optional[str] = None

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
        check_max_memory(self.max_memory)
        check_bool(self.spill, "spill")
        if self.spill_dir is not None and (not isinstance(self.spill_dir, str) or not Path(self.spill_dir).is_dir()):
            raise ConfigError("spill_dir", f"must be an existing directory or null, got {self.spill_dir!r}")


def unsupported(arch: Arch) -> Optional[str]:
    """Why :func:`cleanup` cannot run on ``arch``, or None."""
    kinds = ["embed", "z", "pattern", "resid_pre", "resid_post"] + (["pos_embed"] if arch.has_pos_embed else [])
    kinds += (["mlp_out"] + ([] if arch.parallel else ["resid_mid"])) if arch.has_mlp else []
    kinds += ["ln1_scale"] if arch.norm is not None else []
    missing = arch.missing(*kinds)
    if missing:
        return f"cleanup: the bridge has no hook points {missing}"
    return None


@dataclass(frozen=True)
class Node:
    """A node that writes to the residual stream (see the module doc for names; ``sublayer`` is its
    write index, :meth:`Arch.write_index`)."""

    name: str
    layer: Optional[int]
    head: Optional[int]
    sublayer: int

    def record(self, metric: str, value: float) -> Record:
        """``cleanup/<metric>`` for a head (layer, head), ``.../mlp`` (layer), ``.../embed`` or ``.../pos``."""
        suffix = {"EMBED": "/embed", "POS": "/pos"}.get(self.name, "/mlp" if self.head is None else "")
        return Record(f"cleanup/{metric}{suffix}", float(value), layer=self.layer, head=self.head)


@dataclass(frozen=True)
class CleanupPlan:
    """How :func:`cleanup` splits its work (:func:`plan`).

    writers:        most writers per pass (the tables of a pass are filled in one sweep over the positions).
    rows:           batch rows per forward.
    cache:          one forward records the activations of every row, kept for every pass.
    cache_patterns: ... the attention patterns too (else one more forward reads them for the
                    V-composition); False without ``cache``.
    bytes:          the estimated peak of the probe's own memory.
    forwards:       the forward passes the probe runs (the V-composition forward counted).
    spill:          with ``cache``: the recorded activations (patterns included) and the tables are kept
                    outside the budget, in files (CPU tensors) or host memory (GPU tensors); the
                    activations are read back one chunk of rows at a time, the tables one writer at a time.
    spill_bytes:    with ``spill``: the bytes written outside the budget.
    positions:      kept positions per block of products.
    table_bytes:    most bytes of tables per pass (0: no limit but ``writers``).
    passes:         the passes (sweeps over the positions) the plan makes.
    """

    writers: int
    rows: int
    cache: bool
    cache_patterns: bool
    bytes: int = 0
    forwards: int = 0
    spill: bool = False
    spill_bytes: int = 0
    positions: int = 32
    table_bytes: int = 0
    passes: int = 0


@dataclass
class CleanupResult:
    """Clean-up tables (host tensors). N nodes, W writers, P residual points, percentiles (25, 50, 75).

    nodes, point_names: the nodes and residual points, in forward order.
    writers:        [W] int64 indices into ``nodes``.
    resid_pr:       [W, P, 3] PR(resid at point, writer output) percentiles.
    node_pr:        [W, N, 3] PR(node output, writer output) percentiles for the nodes written at or
                    after the writer (the writer onto itself is 1); NaN for the nodes written before it.
    dla:            [N, batch, pos] DLA of each node; NaN at positions excluded by position_mask.
    peak_pr, writer_score: [W]; cleaned: [W] bool; cleaned_at: [W] int64 point index or -1.
    ranking:        [R] int64 indices into ``writers`` of the cleaned writers, highest score first.
    cleaners:       [W, top_n] int64 node indices, most negative median PR first, -1 padded.
    cleaner_pr:     [W, top_n] median PR of each cleaner, NaN padded.
    cleaner_pr_sum: [W, 3] percentiles of the per-position sum of the cleaners' PRs (NaN if none).
    dla_corr:       [W] Pearson r between the writer's DLA and its cleaners' summed (total) DLA.
    dla_vcomp:      [W, batch, pos] DLA of the V-composition part of the writer's head cleaners (NaN at
                    excluded positions; 0 without head cleaners).
    dla_corr_vcomp: [W] Pearson r between the writer's DLA and ``dla_vcomp``.
    plan:           the chunking used (:class:`CleanupPlan`).
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
    dla_vcomp: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    dla_corr_vcomp: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    plan: Optional[CleanupPlan] = None

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
                metrics["dla_corr_vcomp"] = self.dla_corr_vcomp[w]
            rows += [node.record(metric, value) for metric, value in metrics.items()]
        return rows


def nodes_of(arch: Arch) -> list[Node]:
    """EMBED, POS (standard positional embeddings only), then per layer its heads and its MLP."""
    nodes = [Node("EMBED", None, None, -1)]
    if arch.has_pos_embed:
        nodes.append(Node("POS", None, None, -1))
    for layer in range(arch.n_layers):
        attn = arch.write_index("attn", layer)
        nodes += [Node(f"L{layer}H{h}", layer, h, attn) for h in range(arch.n_heads)]
        if arch.has_mlp:
            nodes.append(Node(f"L{layer}MLP", layer, None, arch.write_index("mlp", layer)))
    return nodes


def residual_points(arch: Arch) -> list[tuple[str, str]]:
    """(point name, hook name) in forward order; point p follows the nodes with write index p - 1."""
    return arch.residual_points()


# --------------------------------------------------------------------------- layout and memory plan


def first_visible(nodes: Sequence[Node]) -> list[int]:
    """For every node, the first node written at or after it (write index >= its own): where the node
    table of a writer starts. Nodes are in forward order, so write indices never decrease along the list."""
    first, result = 0, []
    for node in nodes:
        while nodes[first].sublayer < node.sublayer:
            first += 1
        result.append(first)
    return result


@dataclass(frozen=True)
class _Band:
    """Writers whose tables are stored together: ``rows`` (indices into the writer list) whose first
    visible node lies in one layer (or the embeddings). Each of their tables has the residual points,
    then the nodes from ``first`` (the band's first visible node) on; the rows of nodes a writer was
    written after are filled but never read."""

    rows: tuple
    first: int


def layout(nodes: Sequence[Node], writer_nodes: Sequence[int], n_points: int, column_bytes: int,
           max_writers: int, max_bytes: int = 0) -> list[list[_Band]]:
    """The passes of :func:`cleanup`: writers in the order of their first visible node, cut into passes
    of at most ``max_writers`` writers and (``max_bytes`` > 0) at most ``max_bytes`` bytes of tables
    (one table row is ``column_bytes``), each pass a list of bands. A writer whose table alone exceeds
    ``max_bytes`` gets a pass of its own."""
    visible = first_visible(nodes)
    band_key = [(-1 if nodes[visible[n]].layer is None else nodes[visible[n]].layer) for n in range(len(nodes))]
    order = sorted(range(len(writer_nodes)), key=lambda row: (visible[writer_nodes[row]], row))
    passes: list[list[list]] = []  # [[key, first, rows], ...] per pass
    count = size = 0
    for row in order:
        node = writer_nodes[row]
        bands = passes[-1] if passes else None
        joins = bool(bands) and bands[-1][0] == band_key[node]
        table = (n_points + len(nodes) - (bands[-1][1] if joins else visible[node])) * column_bytes
        if not bands or count + 1 > max_writers or (max_bytes and size + table > max_bytes):
            passes.append([])
            bands, joins, count, size = passes[-1], False, 0, 0
            table = (n_points + len(nodes) - visible[node]) * column_bytes
        if joins:
            bands[-1][2].append(row)
        else:
            bands.append([band_key[node], visible[node], [row]])
        count, size = count + 1, size + table
    return [[_Band(tuple(rows), first) for _, first, rows in bands] for bands in passes]


def _table_rows(bands: Sequence[_Band], n_nodes: int, n_points: int) -> int:
    """Table rows (residual points and nodes) of all writers of ``bands``."""
    return sum(len(band.rows) * (n_points + n_nodes - band.first) for band in bands)


def plan(arch: Arch, *, batch: int, seq: int, n_kept: int, d_vocab: int, budget: int, top_n: int = 8,
         spill_space: int = 0, writers: Optional[Sequence[str]] = None) -> tuple[Optional[CleanupPlan], int]:
    """The chunking of :func:`cleanup` within ``budget`` bytes: (plan, bytes needed at the smallest
    chunk: one row, one position per block, nothing cached, one writer per pass), with plan None when
    even that does not fit.

    Estimated bytes (float32): per row, the recorded activations (embeddings, every head's z, MLP outputs,
    the residual points, and the attention patterns 4 L H T^2 when they are recorded), one forward's
    working set (:func:`forward_bytes_per_row`), the kept activations and the V-composition temporaries;
    per block of ``positions`` kept positions, every node output, the writers' outputs, the residual
    points, the products with a block of nodes and (spilled) the block of every table; the tables of the
    writers of a pass, 4 (P + N - f) M each (f: the first node of its band); one writer's table read back
    and sorted; and the fixed tables (DLA, its directions, the quantile tables, the V-composition
    products of up to ``top_n`` cleaners per writer). A spilled plan keeps the recorded activations of
    every row (patterns included) and every table outside the budget, within ``spill_space`` bytes (0: no
    spilling), in one pass. Of the plans that fit, the one with the fewest forwards wins, then the fewest
    passes, then one that spills nothing, then the most positions per block (fewer, larger products),
    then the most rows per forward. The estimate may fill 85% of the budget (the rest: allocator overhead and small temporaries)."""
    nodes = nodes_of(arch)
    writer_nodes = _writer_nodes(nodes, writers)
    d, n_heads, n_layers, d_head = arch.d_model, arch.n_heads, arch.n_layers, arch.d_head
    n_nodes, n_points, n_writers = len(nodes), len(arch.residual_points()), len(writer_nodes)
    per_layer_out = n_heads * d_head + (d if arch.has_mlp else 0)
    nodes_row = _FLOAT * seq * (d * (1 + int(arch.has_pos_embed)) + n_layers * per_layer_out)
    resid_row = _FLOAT * seq * n_points * d
    patterns_row = _FLOAT * n_layers * n_heads * seq * seq
    scales_row = 2 * _FLOAT * n_layers * seq
    forward_row = forward_bytes_per_row(seq=seq, d_model=d, d_mlp=arch.d_mlp, n_heads=n_heads, d_vocab=d_vocab)
    vcomp_row = _FLOAT * seq * (4 * _VCOMP_BLOCK * d_head + 2 * d)
    work_row = forward_row + nodes_row + vcomp_row  # one forward, the kept activations, V-composition
    recorded_row = nodes_row + resid_row + scales_row + patterns_row  # one row's recorded activations
    fixed = _FLOAT * (n_kept * (n_nodes + 2 * d + 2) + n_writers * (n_kept + batch * seq)
                      + n_nodes * batch * seq + 3 * (n_nodes + n_points) * n_kept  # one table read back, sorted
                      + 3 * n_writers * (n_nodes + n_points) + n_writers * top_n * d_head ** 2)
    usable = int(PLANNED_SHARE * budget)
    one_pass = {}

    def block(q: int) -> int:
        """One block's node outputs, writers' outputs, residual points, directions and products."""
        return _FLOAT * q * (d * (n_nodes + n_writers + n_points + 1) + 2 * (_NODE_BLOCK + n_points) * n_writers)

    def need(cache: bool, cache_patterns: bool, rows: int, q: int, spill: bool) -> int:
        """Bytes without the tables held in memory."""
        if spill:  # a chunk of rows recorded (or read back) at a time, the tables' block buffered
            columns = -(-n_kept // q) * q
            if q not in one_pass:
                one_pass[q] = _table_rows(layout(nodes, writer_nodes, n_points, columns, n_writers)[0], n_nodes,
                                          n_points)
            return fixed + rows * (work_row + recorded_row) + block(q) + _FLOAT * q * one_pass[q]
        stored = batch * (recorded_row - (0 if cache_patterns else patterns_row)) if cache else 0
        transient = rows * (work_row + (0 if cache else recorded_row) + (0 if cache_patterns or not cache else patterns_row))
        return fixed + stored + transient + block(q)

    largest_table = _FLOAT * (n_points + n_nodes) * n_kept
    smallest = int((need(False, False, 1, 1, False) + largest_table) / PLANNED_SHARE)
    best, best_key = None, None
    candidate_rows = sorted({max(1, -(-batch // parts)) for parts in (1, 2, 4, 8, 16, 32, 64, 128, batch)},
                            reverse=True)
    candidate_positions = sorted({min(q, n_kept) for q in _POSITIONS}, reverse=True)
    modes = [(True, True, False), (True, False, False), (False, False, False)]
    spill_base = batch * recorded_row
    if spill_space > spill_base:
        modes.append((True, True, True))
    for cache, cache_patterns, spill in modes:
        for rows in candidate_rows:
            for q in candidate_positions:
                base = need(cache, cache_patterns, rows, q, spill)
                columns = _FLOAT * -(-n_kept // q) * q
                if spill:
                    spilled = spill_base + columns * one_pass[q]
                    if base > usable or spilled > spill_space:
                        continue
                    passes, size = 1, base
                else:
                    if base + columns * (n_points + n_nodes) > usable:
                        continue
                    cut = layout(nodes, writer_nodes, n_points, columns, n_writers, usable - base)
                    passes = len(cut)
                    size = base + max(columns * _table_rows(bands, n_nodes, n_points) for bands in cut)
                    spilled = 0
                forwards = 1 if cache_patterns else 2 if cache else passes + 1
                key = (forwards, passes, spill, -q, -rows)
                if best_key is None or key < best_key:
                    best = CleanupPlan(writers=n_writers, rows=rows, cache=cache, cache_patterns=cache_patterns,
                                       bytes=int(size), forwards=forwards, spill=spill, spill_bytes=int(spilled),
                                       positions=q, table_bytes=0 if spill else usable - base, passes=passes)
                    best_key = key
    return best, smallest


# --------------------------------------------------------------------------- the probe


def cleanup(
    bridge,
    tokens: torch.Tensor,
    *,
    threshold: float = 0.3,
    writer_min: float = 0.7,
    top_n: int = 8,
    writers: Optional[Sequence[str]] = None,
    max_memory: Optional[str] = None,
    spill: bool = True,
    spill_dir: Optional[str] = None,
    attention_mask: Optional[torch.Tensor] = None,
    arch: Optional[Arch] = None,
):
    """Projection-ratio tables, the clean-up scan and both DLA correlations; see the module doc.

    ``writers``: node names to treat as writers (default: every node). ``max_memory`` (bytes or e.g.
    "2GB"; default ``DEFAULT_MAX_MEMORY``) bounds the probe's own memory and sets its chunks
    (:func:`plan`); a budget too small for one writer and one row gives an :class:`Unsupported` with a
    note. ``spill`` / ``spill_dir``: see :class:`Options`. ``arch``: the model's
    :class:`~residual_dynamics.probes.arch.Arch` (built from the bridge if not given). Raises
    ProbeUnsupported on missing hook points (:func:`unsupported`).
    """
    arch = Arch.of(bridge) if arch is None else arch
    raise_if_unsupported(unsupported(arch))
    _writer_nodes(nodes_of(arch), writers)  # unknown writers: ValueError before any compute
    mask = position_mask(tokens, attention_mask)
    budget = memory_budget(max_memory)
    chunking, smallest = plan(arch, batch=tokens.shape[0], seq=tokens.shape[1], n_kept=int(mask.sum()),
                              d_vocab=int(bridge.cfg.d_vocab), budget=budget, top_n=top_n, writers=writers,
                              spill_space=spill_space(tokens.device, spill_dir) if spill else 0)
    if chunking is None:
        return does_not_fit("cleanup", smallest, budget, "raise probes.max_memory or use fewer or shorter prompts")
    return cleanup_with_plan(bridge, tokens, chunking, threshold=threshold, writer_min=writer_min, top_n=top_n,
                             writers=writers, attention_mask=attention_mask, arch=arch, spill_dir=spill_dir)


def spill_space(device: torch.device, spill_dir: Optional[str] = None) -> int:
    """Bytes a spilled plan may write: 80% of the free space of ``spill_dir`` (the temporary directory when
    None) for CPU tensors, 50% of the available host memory (``MemAvailable``; 0 where unknown) for GPU
    tensors."""
    if device.type == "cpu":
        try:
            return int(0.8 * shutil.disk_usage(spill_dir or tempfile.gettempdir()).free)
        except OSError:
            return 0
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(0.5 * int(line.split()[1]) * 1024)
    except OSError:
        pass
    return 0


def cleanup_with_plan(
    bridge,
    tokens: torch.Tensor,
    chunking: CleanupPlan,
    *,
    threshold: float = 0.3,
    writer_min: float = 0.7,
    top_n: int = 8,
    writers: Optional[Sequence[str]] = None,
    attention_mask: Optional[torch.Tensor] = None,
    arch: Optional[Arch] = None,
    spill_dir: Optional[str] = None,
) -> CleanupResult:
    """:func:`cleanup` with an explicit chunking (any :class:`CleanupPlan`, e.g. to check that every
    chunking gives the same numbers); no memory check."""
    arch = Arch.of(bridge) if arch is None else arch
    raise_if_unsupported(unsupported(arch))
    with torch.no_grad():
        probe = _Cleanup(bridge, tokens, attention_mask, arch, writers, chunking)
        return probe.run(threshold, writer_min, top_n, spill_dir=spill_dir)


def _writer_nodes(nodes: list[Node], writers: Optional[Sequence[str]]) -> list[int]:
    names = [node.name for node in nodes]
    writer_names = names if writers is None else list(writers)
    unknown = sorted(set(writer_names) - set(names))
    if unknown or not writer_names:
        raise ValueError(f"cleanup: writers must be a non-empty subset of {names}; unknown: {unknown}")
    return [names.index(name) for name in writer_names]


@dataclass
class _Activations:
    """What one forward recorded for a chunk of rows: node outputs at every position of the rows
    (``z`` per layer for the heads), the residual points at the kept positions, and, where asked for,
    attention patterns and ln1 scales per layer."""

    rows: slice
    keep: torch.Tensor  # [r, pos] bool
    span: tuple[int, int]  # the rows' kept positions in the flattened [M] order
    embed: Optional[torch.Tensor] = None
    pos: Optional[torch.Tensor] = None
    z: dict = field(default_factory=dict)
    mlp: dict = field(default_factory=dict)
    resid: dict = field(default_factory=dict)
    pattern: dict = field(default_factory=dict)
    scale: dict = field(default_factory=dict)


@dataclass
class _Job:
    """The V-composition of one writer with its head cleaners ([(layer, head)])."""

    row: int  # index into the writers
    node: int
    cleaners: list


@dataclass
class _CleanerWork:
    """The V-composition of one cleaner head with the writers it cleans (see ``_Cleanup._prepare``):
    head writers by (layer, head) with their [k, d_head, d_head] mixing products, other writers by
    (node, kind, layer); ``rows`` are the writers' rows, head writers first."""

    layer: int
    head: int
    gain: Optional[torch.Tensor]
    center: bool
    w_v: torch.Tensor
    sources: list
    mixing: Optional[torch.Tensor]
    others: list
    rows: torch.Tensor


class _Cleanup:
    """One run of the probe (see the module doc); all tables stay on the device until :meth:`run` ends."""

    def __init__(self, bridge, tokens, attention_mask, arch: Arch, writers, chunking: CleanupPlan):
        self.bridge, self.tokens, self.attention_mask, self.arch = bridge, tokens, attention_mask, arch
        self.chunking = chunking
        self.nodes = nodes_of(arch)
        self.writer_nodes = _writer_nodes(self.nodes, writers)
        self.visible = first_visible(self.nodes)
        self.sublayer = torch.tensor([node.sublayer for node in self.nodes])
        self.points = residual_points(arch)
        self.mask = position_mask(tokens, attention_mask)
        self.device = tokens.device
        starts = torch.cat([torch.zeros(1, dtype=torch.long), self.mask.sum(1).cumsum(0).cpu()])
        batch = tokens.shape[0]
        self.row_chunks = [slice(s, min(s + max(1, chunking.rows), batch))
                           for s in range(0, batch, max(1, chunking.rows))]
        self.spans = [(int(starts[r.start]), int(starts[r.stop])) for r in self.row_chunks]
        self.n_kept = int(starts[-1])
        self.q = max(1, min(chunking.positions, self.n_kept))
        self.n_blocks = -(-self.n_kept // self.q)
        self.passes = layout(self.nodes, self.writer_nodes, len(self.points), _FLOAT * self.n_blocks * self.q,
                             max(1, chunking.writers), chunking.table_bytes)
        # node groups: (first node index, count, kind, layer); heads of a layer form one group
        self.groups = []
        for index, node in enumerate(self.nodes):
            if node.head is None:
                kind = {"EMBED": "embed", "POS": "pos"}.get(node.name, "mlp")
                self.groups.append((index, 1, kind, node.layer))
            elif node.head == 0:
                self.groups.append((index, arch.n_heads, "heads", node.layer))
        self.group_of = {first + i: group for group in self.groups for first in [group[0]] for i in range(group[1])}
        n_writers, n_nodes, m = len(self.writer_nodes), len(self.nodes), self.n_kept
        d = arch.d_model
        self.direction = torch.empty(m, d, device=self.device)
        self.dla_values = torch.empty(n_nodes, m, device=self.device)
        self.vcomp_values = torch.zeros(n_writers, m, device=self.device)
        self.resid_pr = torch.empty(n_writers, len(self.points), len(QUANTILES), device=self.device)
        self.node_pr = torch.full((n_writers, n_nodes, len(QUANTILES)), math.nan, device=self.device)
        self.cleaner_sum = torch.full((n_writers, len(QUANTILES)), math.nan, device=self.device)
        self.dla_corr = torch.full((n_writers,), math.nan, device=self.device)
        self.scan: dict = {}

    # ---------------------------------------------------------------- driver

    def run(self, threshold: float, writer_min: float, top_n: int, spill_dir: Optional[str] = None) -> CleanupResult:
        if not self.chunking.spill:
            return self._run(threshold, writer_min, top_n, None)
        with _Spilled(self.device, spill_dir) as spilled:
            return self._run(threshold, writer_min, top_n, spilled)

    def _run(self, threshold: float, writer_min: float, top_n: int, spilled: Optional["_Spilled"]) -> CleanupResult:
        chunking, n_layers = self.chunking, self.arch.n_layers
        cache = None
        if chunking.cache:
            every = set(range(n_layers))
            patterns = every if chunking.cache_patterns or spilled is not None else set()
            cache = [] if spilled is None else spilled
            for i in range(len(self.row_chunks)):
                cache.append(self._capture(i, nodes=True, resid=True, logits=True, scales=every, patterns=patterns))
        pending: list[_CleanerWork] = []  # V-composition work waiting for a forward with the patterns
        jobs: list[_Job] = []
        for p, bands in enumerate(self.passes):

            def activations():
                for i in range(len(self.row_chunks)):
                    if cache is not None:
                        yield cache[i]
                        continue
                    layers = {work.layer for work in pending}
                    acts = self._capture(i, nodes=True, resid=True, logits=p == 0, scales=layers, patterns=layers)
                    self._vcomp(acts, pending)
                    yield acts

            with _Tables(bands, len(self.nodes), len(self.points), self.n_blocks, self.q, self.device,
                         spilled) as tables:
                self._sweep(bands, tables, activations(), dla=p == 0)
                if cache is None:
                    pending = []
                found = self._finish_pass(bands, tables, threshold, writer_min, top_n)
            if cache is None:
                pending = self._prepare(found)
            else:
                jobs += found
        if jobs:
            works = self._prepare(jobs)
            if chunking.cache_patterns or spilled is not None:
                for acts in cache:
                    self._vcomp(acts, works)
            else:
                pending = works
        if pending:  # one more forward, up to the last cleaner's layer, for the patterns
            layers = {work.layer for work in pending}
            for i in range(len(self.row_chunks)):
                acts = self._capture(i, nodes=cache is None, resid=False, logits=False, scales=layers,
                                     patterns=layers, stop_after=max(layers))
                if cache is not None:
                    acts = _merged(cache[i], acts)
                self._vcomp(acts, pending)
                del acts
        del cache
        return self._result(top_n)

    # ---------------------------------------------------------------- forwards

    def _capture(self, i: int, *, nodes: bool, resid: bool, logits: bool, scales: set, patterns: set,
                 stop_after: Optional[int] = None) -> _Activations:
        """Run the forward over row chunk ``i`` and record what is asked for (see :class:`_Activations`);
        with ``logits``, the rows' DLA directions too. Without logits the forward stops after the last
        block (or after layer ``stop_after``)."""
        arch, rows = self.arch, self.row_chunks[i]
        keep = self.mask[rows]
        acts = _Activations(rows=rows, keep=keep, span=self.spans[i])
        hooks = []

        def put(table: Optional[dict], key, kept: bool = False):
            def hook_fn(x: torch.Tensor, hook) -> None:
                value = x[keep].float() if kept else x.float()
                if table is None:
                    setattr(acts, key, value)
                else:
                    table[key] = value

            return hook_fn

        if nodes:
            hooks.append((arch.hook("embed"), put(None, "embed")))
            if arch.has_pos_embed:
                hooks.append((arch.hook("pos_embed"), put(None, "pos")))
            for layer in range(arch.n_layers):
                hooks.append((arch.hook("z", layer), put(acts.z, layer)))
                if arch.has_mlp:
                    hooks.append((arch.hook("mlp_out", layer), put(acts.mlp, layer)))
        if resid:
            hooks += [(hook, put(acts.resid, p, kept=True)) for p, (_, hook) in enumerate(self.points)]
        hooks += [(arch.hook("pattern", layer), put(acts.pattern, layer)) for layer in sorted(patterns)]
        if arch.norm is not None:
            hooks += [(arch.hook("ln1_scale", layer), put(acts.scale, layer)) for layer in sorted(scales)]
        final_scale: dict = {}
        if logits and arch.has("ln_final_scale"):
            hooks.append((arch.hook("ln_final_scale"), put(final_scale, "s", kept=True)))
        if not logits:
            stop = (arch.hook("resid_pre", stop_after + 1) if stop_after is not None and stop_after + 1 < arch.n_layers
                    else arch.stop_hook)
            if stop is not None:
                hooks.append((stop, stop_forward_hook))
        kwargs = {} if self.attention_mask is None else {"attention_mask": self.attention_mask[rows]}
        from transformer_lens.model_bridge.exceptions import StopAtLayerException

        try:
            out = self.bridge.run_with_hooks(self.tokens[rows], fwd_hooks=hooks + pattern_release_hooks(self.bridge, arch),
                                              **kwargs)
        except StopAtLayerException:  # TransformerLens catches it itself; kept for bridges that would not
            out = None
        if logits:
            m0, m1 = acts.span
            self.direction[m0:m1] = _dla_direction(self.bridge, out[keep].float(), final_scale.get("s"))
        del out
        if acts.pos is not None and acts.pos.shape[0] != keep.shape[0]:
            acts.pos = acts.pos.expand(keep.shape[0], -1, -1)
        return acts

    # ---------------------------------------------------------------- node outputs

    def _group_output(self, acts: _Activations, kind: str, layer: Optional[int], keep: Optional[torch.Tensor]):
        """[m, n, d] outputs of one node group at the kept positions (``keep``) or [r, pos, n, d] at all."""
        if kind == "heads":
            z = acts.z[layer] if keep is None else acts.z[layer][keep]
            w_o = self.bridge.blocks[layer].attn.W_O.float()  # [head, d_head, d_model]
            return torch.einsum("...hd,hde->...he", z, w_o)
        x = {"embed": acts.embed, "pos": acts.pos, "mlp": acts.mlp.get(layer)}[kind]
        return (x if keep is None else x[keep])[..., None, :]

    def _group_of(self, node_index: int):
        """(first node, count, kind, layer) of the group of node ``node_index``."""
        return self.group_of[node_index]

    # ---------------------------------------------------------------- tables

    def _sweep(self, bands: list[_Band], tables: "_Tables", activations, dla: bool) -> None:
        """Fill the tables of the writers of ``bands`` (and, with ``dla``, every node's DLA): the kept
        positions of every row chunk of ``activations`` go, in order, into blocks of ``self.q``
        positions; each full block gets every node output it needs computed once (:meth:`_fill`) and
        its products with the writers made (:meth:`_products`)."""
        first = 0 if dla else bands[0].first  # the DLA needs every node's output
        d, q = self.arch.d_model, self.q
        writers = [self.writer_nodes[row] for band in bands for row in band.rows]
        outputs = torch.empty(q, len(self.nodes) - first, d, device=self.device)
        resid = torch.empty(q, len(self.points), d, device=self.device)
        start = writers[0] - first
        contiguous = writers == list(range(writers[0], writers[0] + len(writers)))
        pick = None if contiguous else torch.tensor(writers, device=self.device) - first
        visible = [self.visible[node] for node in writers]  # non-decreasing (the layout's order)
        block = fill = 0
        for acts in activations:
            m = acts.span[1] - acts.span[0]
            kept = self._kept(acts, first)
            a = 0
            while a < m:
                b = min(m, a + q - fill)
                self._fill(kept, acts, a, b, outputs[fill : fill + b - a], resid[fill : fill + b - a], first)
                fill, a = fill + b - a, b
                if fill == q:
                    self._products(block, fill, outputs, resid, first, start, pick, visible, bands, tables, dla)
                    block, fill = block + 1, 0
            del kept, acts
        if fill:
            self._products(block, fill, outputs, resid, first, start, pick, visible, bands, tables, dla)

    def _kept(self, acts: _Activations, first: int) -> dict:
        """The recorded outputs of the node groups from node ``first`` on, at the kept positions of
        ``acts``: {group start: [m, heads, d_head] z (heads) or [m, d_model]}."""
        kept = {}
        for start, _, kind, layer in self.groups:
            if start >= first:
                x = {"heads": acts.z.get(layer), "embed": acts.embed, "pos": acts.pos, "mlp": acts.mlp.get(layer)}[kind]
                kept[start] = x[acts.keep]
        return kept

    def _fill(self, kept: dict, acts: _Activations, a: int, b: int, outputs, resid, first: int) -> None:
        """Node outputs (nodes from ``first`` on) and residual points at kept positions a..b of ``acts``."""
        for start, count, kind, layer in self.groups:
            if start < first:
                continue
            if kind == "heads":
                w_o = self.bridge.blocks[layer].attn.W_O.float()  # [head, d_head, d_model]
                outputs[:, start - first : start - first + count] = torch.einsum("phd,hde->phe", kept[start][a:b], w_o)
            else:
                outputs[:, start - first] = kept[start][a:b]
        for p in range(len(self.points)):
            resid[:, p] = acts.resid[p][a:b]

    def _products(self, block: int, fill: int, outputs, resid, first: int, start: int, pick, visible: list[int],
                  bands: list[_Band], tables: "_Tables", dla: bool) -> None:
        """The PR tables of every writer of ``bands`` (and, with ``dla``, every node's DLA) at the ``fill``
        positions of block ``block``: per position, one batched matrix product of a block of
        :data:`_NODE_BLOCK` node outputs with the outputs of the writers that see any of them (writers
        are ordered by their first visible node, so those are the first k), then each band's share
        copied into its table block."""
        n_points, n_nodes = len(self.points), len(self.nodes)
        x = outputs[:fill]
        w = x[:, start : start + len(visible)] if pick is None else x.index_select(1, pick)  # [q, W, d]
        norm2 = torch.einsum("qwd,qwd->qw", w, w)
        norm2 = torch.where(norm2 > 0, norm2, torch.nan)[:, None]  # [q, 1, W]
        w_t = w.transpose(1, 2)  # [q, d, W]
        parts = tables.block(block)  # per band [writers, rows, positions]
        offsets = [0]
        for band in bands:
            offsets.append(offsets[-1] + len(band.rows))
        values = torch.bmm(resid[:fill], w_t) / norm2  # [q, P, W]
        for b, band in enumerate(bands):
            parts[b][:, :n_points, :fill] = values[:, :, offsets[b] : offsets[b + 1]].permute(2, 1, 0)
        for n0 in range(bands[0].first, n_nodes, _NODE_BLOCK):
            n1 = min(n0 + _NODE_BLOCK, n_nodes)
            k = bisect.bisect_left(visible, n1)  # the writers that see a node of n0..n1
            values = torch.bmm(x[:, n0 - first : n1 - first], w_t[..., :k]) / norm2[..., :k]  # [q, n, k]
            for b, band in enumerate(bands):
                w0, w1 = offsets[b], min(offsets[b + 1], k)
                lo = max(n0, band.first)
                if w0 >= k:
                    break
                if lo < n1:
                    rows = slice(n_points + lo - band.first, n_points + n1 - band.first)
                    parts[b][: w1 - w0, rows, :fill] = values[:, lo - n0 :, w0:w1].permute(2, 1, 0)
        tables.commit(block)
        if dla:
            m0 = block * self.q
            direction = self.direction[m0 : m0 + fill, :, None]  # [q, d, 1]
            self.dla_values[:, m0 : m0 + fill] = torch.bmm(x, direction)[..., 0].T

    def _finish_pass(self, bands: list[_Band], tables: "_Tables", threshold, writer_min, top_n) -> list[_Job]:
        """Quantiles, the scan, the cleaners' summed PR and the total-DLA correlation of the writers of
        ``bands``, one writer's complete table at a time; returns their V-composition jobs."""
        n_points, jobs = len(self.points), []
        for b, band in enumerate(bands):
            for j, row in enumerate(band.rows):
                node = self.writer_nodes[row]
                seen = self.visible[node]
                table = tables.read(b, j, self.n_kept)  # [P + N - band.first, M]
                nodes = table[n_points + seen - band.first :]  # from the writer's first visible node
                self.resid_pr[row] = _nan_quantiles(table[:n_points])
                self.node_pr[row, seen:] = _nan_quantiles(nodes)
                scan = _scan(self.sublayer, [node], self.resid_pr[row : row + 1, :, 1], self.node_pr[row : row + 1, :, 1],
                             threshold, writer_min, top_n)
                for key, value in scan.items():
                    if key not in self.scan:
                        self.scan[key] = value.new_empty((len(self.writer_nodes),) + value.shape[1:])
                    self.scan[key][row] = value[0]
                chosen = scan["cleaners"][0]
                chosen = chosen[chosen >= 0]
                if not len(chosen):
                    continue
                self.cleaner_sum[row] = _nan_quantiles(nodes[(chosen - seen).to(self.device)].sum(0))
                chosen = chosen.to(self.device)
                self.dla_corr[row] = _pearson(self.dla_values[node], self.dla_values[chosen].sum(0))
                heads = [(self.nodes[i].layer, self.nodes[i].head) for i in chosen.tolist() if self.nodes[i].head is not None]
                if heads:
                    jobs.append(_Job(row, node, heads))
                del table, nodes
        return jobs

    def _prepare(self, jobs: list[_Job]) -> list["_CleanerWork"]:
        """The V-composition work of ``jobs`` grouped by cleaner head, with every row-independent
        product made once: for head writers the [d_head, d_head] products W_O,w C diag(g) W_V,c."""
        arch, blocks = self.arch, self.bridge.blocks
        group_per_kv = arch.n_heads // arch.n_kv_heads
        by_cleaner: dict = {}
        for job in jobs:
            for cleaner in job.cleaners:
                by_cleaner.setdefault(cleaner, []).append(job)
        works = []
        for (layer, head), cleaned in sorted(by_cleaner.items()):
            gain, center = _norm_map(blocks[layer].ln1)
            w_v = blocks[layer].attn.W_V[head // group_per_kv].float()  # [d_model, d_head]
            head_jobs = [job for job in cleaned if self._group_of(job.node)[2] == "heads"]
            other_jobs = [job for job in cleaned if self._group_of(job.node)[2] != "heads"]
            sources, reads = [], []
            for job in head_jobs:
                first, _, _, writer_layer = self._group_of(job.node)
                sources.append((writer_layer, job.node - first))
                reads.append(blocks[writer_layer].attn.W_O[job.node - first].float())  # [d_head, d_model]
            mixing = None
            if reads:
                read = torch.stack(reads)
                read = read - read.mean(-1, keepdim=True) if center else read
                read = read * gain if gain is not None else read
                mixing = read @ w_v  # [k, d_head, d_head]
            works.append(_CleanerWork(
                layer=layer, head=head, gain=gain, center=center, w_v=w_v, sources=sources, mixing=mixing,
                others=[(job.node,) + self._group_of(job.node)[2:] for job in other_jobs],
                rows=torch.tensor([job.row for job in head_jobs + other_jobs], device=self.device)))
        return works

    def _vcomp(self, acts: _Activations, works: list["_CleanerWork"]) -> None:
        """Add the DLA of the V-composition part of the cleaners of ``works`` at the rows of ``acts``
        (:data:`_VCOMP_BLOCK` writers of a cleaner at a time)."""
        m0, m1 = acts.span
        if not works or m1 == m0:
            return
        direction = self.direction[m0:m1]
        for work in works:
            pattern = acts.pattern[work.layer][:, work.head]  # [r, query, key]
            query = direction @ self.bridge.blocks[work.layer].attn.W_O[work.head].float().T  # [m, d_head]
            n_heads = len(work.sources)
            for s0 in range(0, n_heads + len(work.others), _VCOMP_BLOCK):
                s1 = min(s0 + _VCOMP_BLOCK, n_heads + len(work.others))
                parts = []
                if s0 < n_heads:
                    sources = work.sources[s0 : min(s1, n_heads)]
                    z = torch.stack([acts.z[layer][:, :, head] for layer, head in sources], dim=2)  # [r, pos, k, dh]
                    parts.append(torch.einsum("rtkd,kde->krte", z, work.mixing[s0 : s0 + len(sources)]))
                for node, kind, writer_layer in work.others[max(0, s0 - n_heads) : max(0, s1 - n_heads)]:
                    x = self._group_output(acts, kind, writer_layer, None)[..., 0, :]  # [r, pos, d_model]
                    x = x - x.mean(-1, keepdim=True) if work.center else x
                    parts.append(((x * work.gain if work.gain is not None else x) @ work.w_v)[None])
                values = parts[0] if len(parts) == 1 else torch.cat(parts)  # [k, r, pos, d_head]
                if self.arch.norm is not None:
                    values = values / acts.scale[work.layer]
                mixed = torch.einsum("rpi,krid->krpd", pattern, values)[:, acts.keep]
                self.vcomp_values[work.rows[s0:s1], m0:m1] += (mixed * query).sum(-1)

    # ---------------------------------------------------------------- result

    def _result(self, top_n: int) -> CleanupResult:
        scan = self.scan
        cleaned, score = scan["cleaned"], scan["writer_score"]
        ranked = cleaned.nonzero()[:, 0]
        ranking = ranked[score[ranked].argsort(descending=True, stable=True)]
        dla_corr_vcomp = torch.full((len(self.writer_nodes),), math.nan, device=self.device)
        for row, node in enumerate(self.writer_nodes):
            if (scan["cleaners"][row] >= 0).any():
                dla_corr_vcomp[row] = _pearson(self.dla_values[node], self.vcomp_values[row])
        shape = self.tokens.shape
        dla = torch.full((len(self.nodes), *shape), math.nan, device=self.device)
        dla[:, self.mask] = self.dla_values
        vcomp = torch.full((len(self.writer_nodes), *shape), math.nan, device=self.device)
        vcomp[:, self.mask] = self.vcomp_values
        return CleanupResult(
            nodes=self.nodes,
            point_names=[name for name, _ in self.points],
            writers=torch.tensor(self.writer_nodes, dtype=torch.int64),
            resid_pr=self.resid_pr.cpu(),
            node_pr=self.node_pr.cpu(),
            dla=dla.cpu(),
            cleaner_pr_sum=self.cleaner_sum.cpu(),
            dla_corr=self.dla_corr.cpu(),
            dla_vcomp=vcomp.cpu(),
            dla_corr_vcomp=dla_corr_vcomp.cpu(),
            ranking=ranking,
            plan=self.chunking,
            **{key: value.cpu() for key, value in scan.items()},
        )


class _Tables:
    """The PR tables of the writers of one pass, by band: band b is a [blocks, writers, rows, positions]
    array (rows: the residual points, then the nodes from the band's first on; positions: one block of
    kept positions, the last block padded). Filled one block at a time (:meth:`block`, then
    :meth:`commit`), read back one writer at a time (:meth:`read`: its [rows, M] table on the device).
    Kept on the device, or, in a spilled plan, in files in the spill directory (CPU tensors; written as
    each block is committed, read back memory-mapped) or in host memory (GPU tensors)."""

    def __init__(self, bands: list[_Band], n_nodes: int, n_points: int, n_blocks: int, q: int,
                 device: torch.device, spilled: Optional["_Spilled"]):
        self.device = device
        self.shapes = [(n_blocks, len(band.rows), n_points + n_nodes - band.first, q) for band in bands]
        self.paths: list = []
        self.files: list = []
        self.stored = None
        if spilled is not None and spilled.to_disk:
            self.paths = [os.path.join(spilled.path, f"tables{b:04d}.f32") for b in range(len(bands))]
            self.files = [open(path, "wb") for path in self.paths]
        else:
            home = torch.device("cpu") if spilled is not None else device  # spilled GPU tables: host memory
            self.stored = [torch.empty(shape, device=home) for shape in self.shapes]
        buffered = self.stored is None or self.stored[0].device != device
        self.buffers = [torch.empty(shape[1:], device=device) for shape in self.shapes] if buffered else None

    def __enter__(self) -> "_Tables":
        return self

    def __exit__(self, *exc) -> None:
        for file in self.files:
            file.close()
        for path in self.paths:
            with contextlib.suppress(OSError):
                os.remove(path)
        self.stored = self.buffers = None

    def block(self, i: int) -> list[torch.Tensor]:
        """Writable [writers, rows, positions] of block ``i``, per band."""
        return self.buffers if self.buffers is not None else [table[i] for table in self.stored]

    def commit(self, i: int) -> None:
        """Block ``i`` is complete."""
        if self.files:
            for file, buffer in zip(self.files, self.buffers):
                buffer.numpy().tofile(file)
        elif self.buffers is not None:
            for table, buffer in zip(self.stored, self.buffers):
                table[i].copy_(buffer)

    def read(self, b: int, j: int, n_kept: int) -> torch.Tensor:
        """The [rows, n_kept] table of writer ``j`` of band ``b``, contiguous, on the device."""
        n_blocks, _, rows, q = self.shapes[b]
        if self.files:
            if not self.files[b].closed:
                for file in self.files:
                    file.close()
            stored = np.memmap(self.paths[b], dtype=np.float32, mode="r", shape=self.shapes[b])[:, j]
            table = torch.from_numpy(np.array(stored.transpose(1, 0, 2), order="C").reshape(rows, n_blocks * q))
        else:
            table = self.stored[b][:, j].permute(1, 0, 2).reshape(rows, n_blocks * q)
        table = table.to(self.device)
        return table if n_blocks * q == n_kept else table[:, :n_kept].contiguous()


class _Spilled:
    """The recorded activations of every chunk of rows, kept outside the probe's memory budget: written
    with ``torch.save`` to a private temporary directory (CPU tensors; read back memory-mapped, one chunk
    of rows at a time, and removed on exit) or copied to host memory (GPU tensors). A list of
    :class:`_Activations` to the driver: ``append``, ``[i]``, iteration."""

    _TABLES = ("z", "mlp", "resid", "pattern", "scale")

    def __init__(self, device: torch.device, directory: Optional[str]):
        self.device = device
        self.to_disk = device.type == "cpu"
        self.directory = directory
        self.items: list = []
        self._tmp: Optional[tempfile.TemporaryDirectory] = None

    def __enter__(self) -> "_Spilled":
        if self.to_disk:
            self._tmp = tempfile.TemporaryDirectory(prefix="residual-dynamics-cleanup-", dir=self.directory)
        return self

    def __exit__(self, *exc) -> None:
        self.items.clear()
        if self._tmp is not None:
            self._tmp.cleanup()

    def append(self, acts: _Activations) -> None:
        state = {"embed": acts.embed, "pos": acts.pos, **{name: getattr(acts, name) for name in self._TABLES}}
        head = (acts.rows, acts.keep, acts.span)
        if self.to_disk:
            path = os.path.join(self._tmp.name, f"rows{len(self.items):05d}.pt")
            torch.save(state, path)
            self.items.append((head, path))
        else:
            host = {key: (value.cpu() if isinstance(value, torch.Tensor) else
                          {k: v.cpu() for k, v in value.items()} if isinstance(value, dict) else value)
                    for key, value in state.items()}
            self.items.append((head, host))

    def __len__(self) -> int:
        return len(self.items)

    @property
    def path(self) -> str:
        """The private directory of the files (CPU tensors)."""
        return self._tmp.name

    def __getitem__(self, i: int) -> _Activations:
        (rows, keep, span), stored = self.items[i]
        if self.to_disk:
            state = torch.load(stored, mmap=True, weights_only=True)
        else:
            state = {key: (value.to(self.device) if isinstance(value, torch.Tensor) else
                           {k: v.to(self.device) for k, v in value.items()} if isinstance(value, dict) else value)
                     for key, value in stored.items()}
        return _Activations(rows=rows, keep=keep, span=span, **state)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def _merged(stored: _Activations, extra: _Activations) -> _Activations:
    """The stored activations of a row chunk with the patterns and scales of a later forward."""
    return _Activations(rows=stored.rows, keep=stored.keep, span=stored.span, embed=stored.embed, pos=stored.pos,
                        z=stored.z, mlp=stored.mlp, resid=stored.resid, pattern={**stored.pattern, **extra.pattern},
                        scale={**stored.scale, **extra.scale})


def _norm_map(norm) -> tuple[Optional[torch.Tensor], bool]:
    """(gain or None, centers) of a norm bridge's linear action at a frozen scale: the gain is the
    weight (1 + weight for offset norms; None for param-free norms and models without norms), and
    LayerNorms center (RMSNorms and identity slots do not)."""
    is_norm = hasattr(norm, "uses_rms_norm")
    weight = getattr(norm, "weight", None) if is_norm else None
    gain = None
    if isinstance(weight, torch.Tensor):
        gain = 1.0 + weight.float() if getattr(norm, "uses_weight_offset", False) else weight.float()
    return gain, bool(is_norm and not norm.uses_rms_norm)


def _dla_direction(bridge, logits: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """[M, d_model] vector whose dot product with a node output is its DLA (see the module doc)."""
    top2 = logits.topk(2, dim=-1).indices
    w_u = bridge.W_U.float()  # [d_model, d_vocab]
    direction = w_u[:, top2[:, 0]].T - w_u[:, top2[:, 1]].T
    gain, center = _norm_map(bridge.ln_final)
    if gain is not None:
        direction = direction * gain
    if center:
        # Centering is a symmetric projection: C(c) . v == c . C(v).
        direction = direction - direction.mean(-1, keepdim=True)
    if scale is not None:
        direction = direction / scale
    return direction


def _scan(sublayer: torch.Tensor, writer_nodes, resid_median, node_median, threshold, writer_min, top_n) -> dict:
    """Writer scores, cleaned flags and cleaners from the median tables (see the module doc); ``sublayer``
    is every node's write index."""
    n_writers = len(writer_nodes)
    peak_pr = torch.full((n_writers,), math.nan)
    score = torch.zeros(n_writers)
    cleaned = torch.zeros(n_writers, dtype=torch.bool)
    cleaned_at = torch.full((n_writers,), -1, dtype=torch.int64)
    cleaners = torch.full((n_writers, top_n), -1, dtype=torch.int64)
    cleaner_pr = torch.full((n_writers, top_n), math.nan)
    resid_median, node_median = resid_median.cpu(), node_median.cpu()
    for w, node_index in enumerate(writer_nodes):
        written = int(sublayer[node_index]) + 1
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
        candidates = ((sublayer > sublayer[node_index]) & (node_median[w] < 0)).nonzero()[:, 0]
        order = node_median[w, candidates].argsort()[:top_n]
        cleaners[w, : len(order)] = candidates[order]
        cleaner_pr[w, : len(order)] = node_median[w, candidates[order]]
    return {
        "peak_pr": peak_pr,
        "writer_score": score,
        "cleaned": cleaned,
        "cleaned_at": cleaned_at,
        "cleaners": cleaners,
        "cleaner_pr": cleaner_pr,
    }


def _nan_quantiles(values: torch.Tensor) -> torch.Tensor:
    """QUANTILES of the last dimension ignoring NaNs (linear interpolation, as numpy); [..., 3].

    Sort-based rather than torch.nanquantile, which refuses inputs above 16M elements; on the CPU with
    numpy's sort (SIMD, several times faster than torch's there; the same order, NaNs last).
    """
    if values.device.type == "cpu":
        ordered = torch.from_numpy(np.sort(values.numpy(), axis=-1))
    else:
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
    return (x * y).sum() / denominator if denominator > 0 else torch.tensor(math.nan, dtype=torch.float64,
                                                                            device=x.device)
