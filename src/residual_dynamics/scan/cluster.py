"""Clustering the components' attribution profiles (step 6 of the scan: "cluster the profiles to show how
different components learn similar functions of the injection coefficient").

A profile is a component's attribution as a function of the coefficient, ``a = attr(c_1..c_N)``. It is
normalised to its shape, ``n = (a - mean(a)) / ||a - mean(a)||_2`` (offset and scale removed, sign kept:
a component that pushes the logit difference up as c grows and one that pushes it down are different
shapes). Components whose range ``max(a) - min(a)`` is below ``min_range`` times the largest range of all
components are *flat* (label -1): their shape is mostly rounding. The others are clustered on their
normalised profiles, with scikit-learn's ``KMeans`` (``method="kmeans"``, Euclidean distance, which on
unit vectors is a monotone function of the correlation) or with scipy's average-linkage hierarchical
clustering on the correlation distance ``1 - n_i . n_j`` (``method="hierarchical"``, cut into at most
``n_clusters`` clusters). Clusters are numbered by decreasing total range of their members (0 = the
cluster that moves the logit difference most).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHODS = ("kmeans", "hierarchical")


@dataclass
class Clusters:
    """labels:   [n_components] cluster of each component (-1: flat).
    centers:  [n_clusters, N] mean normalised profile of each cluster.
    ranges:   [n_components] max - min of each profile.
    normalised: [n_components, N] the normalised profiles (0 for flat components).
    """

    labels: np.ndarray
    centers: np.ndarray
    ranges: np.ndarray
    normalised: np.ndarray

    @property
    def n_clusters(self) -> int:
        return len(self.centers)

    def members(self, cluster: int) -> np.ndarray:
        """Indices of the members of ``cluster``, largest range first."""
        index = np.flatnonzero(self.labels == cluster)
        return index[np.argsort(-self.ranges[index], kind="stable")]


def normalise(profiles: np.ndarray) -> np.ndarray:
    """Each row minus its mean, divided by its L2 norm (rows that are constant stay 0)."""
    centred = profiles - profiles.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    return np.divide(centred, norms, out=np.zeros_like(centred), where=norms > 0)


def cluster_profiles(profiles, n_clusters: int = 4, method: str = "kmeans", min_range: float = 0.02,
                     seed: int = 0) -> Clusters:
    """Cluster the rows of ``profiles`` ([n_components, N]) by shape; see the module doc."""
    profiles = np.asarray(profiles, dtype=np.float64)
    if profiles.ndim != 2 or profiles.shape[1] < 2:
        raise ValueError(f"profiles must be [n_components, N >= 2], got shape {profiles.shape}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    ranges = profiles.max(axis=1) - profiles.min(axis=1)
    top = ranges.max() if len(ranges) else 0.0
    moving = ranges > min_range * top if top > 0 else np.zeros(len(ranges), dtype=bool)
    normalised = normalise(profiles)
    normalised[~moving] = 0.0
    labels = np.full(len(profiles), -1, dtype=np.int64)
    points = normalised[moving]
    k = min(n_clusters, len(points))
    if k == 0:
        return Clusters(labels, np.zeros((0, profiles.shape[1])), ranges, normalised)
    if k == 1:
        raw = np.zeros(len(points), dtype=np.int64)
    elif method == "kmeans":
        from sklearn.cluster import KMeans

        raw = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(points)
    else:
        from scipy.cluster.hierarchy import fcluster, linkage

        tree = linkage(points, method="average", metric="correlation") if points.shape[1] > 2 else \
            linkage(points, method="average", metric="euclidean")
        raw = fcluster(tree, t=k, criterion="maxclust") - 1
    found = np.unique(raw)
    weight = {c: ranges[moving][raw == c].sum() for c in found}
    order = sorted(found, key=lambda c: -weight[c])
    relabel = {old: new for new, old in enumerate(order)}
    labels[moving] = [relabel[c] for c in raw]
    centers = np.stack([normalised[labels == c].mean(axis=0) for c in range(len(order))])
    return Clusters(labels, centers, ranges, normalised)
