"""How close an ANN search comes to exact search, computed in one place (search-parameter tuning, index.bench,
index.evaluate): exact neighbours from ``faiss.knn`` and the overlap of two result tables from
``faiss.contrib.evaluation.knn_intersection_measure``."""
from __future__ import annotations

import faiss
import numpy as np
from faiss.contrib.evaluation import knn_intersection_measure

from index.factory import METRICS


def exact_knn(xq: np.ndarray, xb: np.ndarray, k: int, metric: str = "ip") -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of each query: D (nq, k), I (nq, k) positions in ``xb`` (brute force, no index)."""
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    return faiss.knn(xq, xb, int(k), METRICS[metric])


def overlap(I: np.ndarray, gt: np.ndarray, k: int | None = None) -> float:
    """Recall@k of result ids ``I`` against exact ids ``gt`` (nq, >= k each): the mean fraction of the exact top
    ``k`` that the search returned (the first ``k`` columns of both; ``k`` defaults to ``gt``'s width)."""
    k = gt.shape[1] if k is None else k
    return float(knn_intersection_measure(np.asarray(I)[:, :k], np.asarray(gt)[:, :k]))


def without_own(I: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Each row of ids without its ``own`` id (a query that is a stored item), cut to ``k``; -1 fills a row
    that held neither ``k`` other ids."""
    out = np.full((len(I), k), -1, np.int64)
    for r, (row, o) in enumerate(zip(I, own)):
        kept = row[row != o][:k]
        out[r, :len(kept)] = kept
    return out


def merge_topk(D: np.ndarray, I: np.ndarray, D2: np.ndarray, I2: np.ndarray, k: int,
               metric: str = "ip") -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of two result sets of the same queries (D, I side by side, ids -1 for padding, which sorts
    last): a running top-k over chunks of a collection, or over an index and its delta."""
    D, I = np.concatenate([D, D2], axis=1), np.concatenate([I, I2], axis=1)
    key = np.where(I < 0, np.inf, -D if metric == "ip" else D)  # smaller is better
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(D, order, axis=1), np.take_along_axis(I, order, axis=1)
