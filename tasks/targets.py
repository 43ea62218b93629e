"""Training targets of proposals: IoU, IoP, IoG against the majority identity.

For a proposal P (a set of faces) with majority label g (ties: the smallest label),
G = every face labelled g in the whole set, and

* IoU(P) = |P ∩ G| / |P ∪ G|
* IoP(P) = |P ∩ G| / |P|          (purity)
* IoG(P) = |P ∩ G| / |G|          (completeness)

GCN-S node targets: 1 for the members that share the seed vertex's label.
"""

from __future__ import annotations

import numpy as np


def proposal_targets(offsets: np.ndarray, members: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """IoU / IoP / IoG and the majority label of every proposal (CSR input).

    Parameters
    ----------
    offsets : (P+1,) int64
        CSR offsets into ``members``.
    members : (M,) int64
        Face ids of every proposal, concatenated.
    labels : (N,) int
        Ground-truth label of every face (any integers).

    Returns
    -------
    dict
        ``iou``, ``iop``, ``iog`` (P float32), ``majority`` (P int64 label values),
        ``inter`` (P int64: |P ∩ G|).
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    members = np.asarray(members, dtype=np.int64)
    labels = np.asarray(labels)
    n_prop = len(offsets) - 1
    uniq, lab = np.unique(labels, return_inverse=True)
    class_size = np.bincount(lab, minlength=len(uniq)).astype(np.int64)
    sizes = np.diff(offsets)
    pid = np.repeat(np.arange(n_prop, dtype=np.int64), sizes)
    ml = lab[members]
    # count (proposal, label) pairs: sort by (pid, label)
    key = pid * len(uniq) + ml
    ukey, cnt = np.unique(key, return_counts=True)
    kp = ukey // len(uniq)
    kl = ukey % len(uniq)
    # majority per proposal: max count, ties -> smallest label (lexsort: last key primary)
    order = np.lexsort((kl, -cnt, kp))
    first = np.ones(len(order), dtype=bool)
    first[1:] = kp[order][1:] != kp[order][:-1]
    best = order[first]
    inter = np.zeros(n_prop, dtype=np.int64)
    maj = np.full(n_prop, -1, dtype=np.int64)
    inter[kp[best]] = cnt[best]
    maj_idx = np.zeros(n_prop, dtype=np.int64)
    maj_idx[kp[best]] = kl[best]
    maj[kp[best]] = uniq[kl[best]]
    gsize = class_size[maj_idx]
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(sizes > 0, inter / (sizes + gsize - inter), 0.0)
        iop = np.where(sizes > 0, inter / np.maximum(sizes, 1), 0.0)
        iog = np.where(sizes > 0, inter / np.maximum(gsize, 1), 0.0)
    return {"iou": iou.astype(np.float32), "iop": iop.astype(np.float32), "iog": iog.astype(np.float32),
            "majority": maj, "inter": inter}


def seed_targets(member_labels: np.ndarray, seed: int) -> np.ndarray:
    """GCN-S node targets of one proposal: 1 where a member has the seed vertex's label."""
    member_labels = np.asarray(member_labels)
    return (member_labels == member_labels[seed]).astype(np.int64)
