"""Tiny gradient-boosted regression trees in numpy: deterministic fit, vectorised predict, npz I/O.

Trees are complete binary trees of fixed depth stored as arrays (no pickle, no object graph):
``feature[t, node]``, ``threshold[t, node]`` for the 2^d - 1 internal nodes in breadth-first
order (children of node i are 2i+1 and 2i+2; ``x <= threshold`` goes left) and ``leaf[t, k]``
for the 2^d leaves. A node that should not split gets threshold +inf (everything goes left).
Prediction is ``base + sum of leaves``; the committed 250-tree depth-4 model is about 70 kB and
predicts one sample in well under a millisecond.

Fit: squared error, candidate thresholds at feature quantiles (`n_bins`), exhaustive split
search with a minimum leaf size, shrinkage `learning_rate`. No randomness, so equal inputs give
bit-identical models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FORMAT = 1
#: Hyper-parameters of the committed model (tools/train_fpquality.py, bench/bench_fpquality.py).
TRAIN_PARAMS = {"n_trees": 250, "depth": 4, "learning_rate": 0.05, "min_leaf": 10, "n_bins": 32}


def _bin_edges(x: np.ndarray, n_bins: int) -> list[np.ndarray]:
    edges = []
    qs = np.linspace(0, 1, n_bins + 1)[1:-1]
    for j in range(x.shape[1]):
        e = np.unique(np.quantile(x[:, j], qs, method="lower"))
        edges.append(e)
    return edges


def fit(x: np.ndarray, y: np.ndarray, n_trees: int = 150, depth: int = 3, learning_rate: float = 0.08,
        min_leaf: int = 8, n_bins: int = 32) -> dict[str, np.ndarray]:
    """Fit a boosted ensemble to (x, y); returns the model as a dict of arrays."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    n, p = x.shape
    edges = _bin_edges(x, n_bins)
    # Bin index of every value: number of edges strictly below it -> x <= edges[b] iff bin <= b.
    xb = np.stack([np.searchsorted(edges[j], x[:, j], side="left") for j in range(p)], axis=1)
    n_int, n_leaf = 2 ** depth - 1, 2 ** depth
    feat = np.zeros((n_trees, n_int), np.int32)
    thr = np.full((n_trees, n_int), np.inf)
    leaf = np.zeros((n_trees, n_leaf))
    base = float(y.mean())
    pred = np.full(n, base)
    for t in range(n_trees):
        r = y - pred
        node_of = np.zeros(n, np.int64)  # current node index of each sample
        for node in range(n_int):
            sel = node_of == node
            cnt = int(sel.sum())
            best = (0.0, -1, -1)
            if cnt >= 2 * min_leaf:
                rs, total = r[sel], r[sel].sum()
                for j in range(p):
                    nb = len(edges[j]) + 1
                    hs = np.bincount(xb[sel, j], weights=rs, minlength=nb)
                    hc = np.bincount(xb[sel, j], minlength=nb)
                    cs, cc = np.cumsum(hs)[:-1], np.cumsum(hc)[:-1]
                    ok = (cc >= min_leaf) & (cnt - cc >= min_leaf)
                    if not ok.any():
                        continue
                    with np.errstate(divide="ignore", invalid="ignore"):
                        gain = cs ** 2 / cc + (total - cs) ** 2 / (cnt - cc) - total ** 2 / cnt
                    gain = np.where(ok, gain, -np.inf)
                    b = int(np.argmax(gain))
                    if gain[b] > best[0] + 1e-12:
                        best = (float(gain[b]), j, b)
            if best[1] >= 0:
                j, b = best[1], best[2]
                feat[t, node], thr[t, node] = j, edges[j][b]
                go_right = sel & (xb[:, j] > b)
            else:
                go_right = np.zeros(n, bool)
            node_of = np.where(sel, 2 * node + 1 + go_right, node_of)
        leaf_idx = node_of - n_int
        sums = np.bincount(leaf_idx, weights=r, minlength=n_leaf)
        cnts = np.bincount(leaf_idx, minlength=n_leaf)
        leaf[t] = learning_rate * np.divide(sums, cnts, out=np.zeros(n_leaf), where=cnts > 0)
        pred += leaf[t][leaf_idx]
    return {"format": np.array(FORMAT), "base": np.array(base), "feature": feat, "threshold": thr,
            "leaf": leaf, "depth": np.array(depth)}


def predict(model: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Predictions for the rows of `x` (n, p)."""
    x = np.atleast_2d(np.asarray(x, np.float64))
    feat, thr, leaf = model["feature"], model["threshold"], model["leaf"]
    n_trees, n_int = feat.shape
    depth = int(model["depth"])
    node = np.zeros((x.shape[0], n_trees), np.int64)
    trees = np.arange(n_trees)[None, :]
    rows = np.arange(x.shape[0])[:, None]
    for _ in range(depth):
        f = feat[trees, node]
        node = 2 * node + 1 + (x[rows, f] > thr[trees, node])
    return float(model["base"]) + leaf[trees, node - n_int].sum(axis=1)


def save(model: dict[str, np.ndarray], path: Path) -> None:
    """Write the model as an uncompressed .npz of plain arrays (stable bytes for equal models)."""
    with open(path, "wb") as f:
        np.savez(f, **model)


def load(path: Path) -> dict[str, np.ndarray]:
    """Read a model written by `save`; refuses pickled objects and unknown formats."""
    with np.load(path, allow_pickle=False) as z:
        model = {k: z[k] for k in z.files}
    if int(model.get("format", -1)) != FORMAT:
        raise ValueError(f"{path}: not a fpquality model of format {FORMAT}")
    return model
