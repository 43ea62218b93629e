"""Built-in face-like dataset: seeded, L2-normalised embeddings with identity labels.

Used by ``facecluster demo``/``synth``, the benchmarks (10^5-10^7 faces) and GCN
training. It imitates what makes real face clustering hard rather than any one
face model:

* **Long-tailed identity sizes** — a share of identities has one face; the rest
  have log-normally distributed sizes up to ``max_size`` (hundreds).
* **Look-alike families** — identities are drawn around a shared family centre
  (relatives, similar age/ethnicity/appearance), so their centres have cosine
  ``family_cos`` with each other instead of ~0. These create the bridges that
  merge two identities under single linkage.
* **Modes** — every identity has several modes (pose, age, makeup, ...). A mode is
  the identity centre moved along a small set of *shared* nuisance directions
  (the same "pose" subspace for everyone), so modes of one identity can be
  farther apart than two look-alikes' faces.
* **Identity-specific spread** — the within-identity noise scale varies per
  identity (log-normal), plus per-face quality variation, so tight identities sit
  at cosine ~0.8 and loose ones at ~0.4: no single threshold fits all.
* **Low-quality faces** — a small share of faces is pulled toward a shared
  "low-quality" direction (blur, occlusion), which makes poor faces of different
  people similar to each other, as in real data.
* **Realistic cosine scale** — centres and noise live on an anisotropic spectrum
  (effective dimension ≈ 110 at d = 256) with a common mean direction, so
  impostor pairs sit at 0.08 ± 0.09 (LFW/SFace: 0.09 ± 0.09) and genuine pairs
  at 0.58 ± 0.19 (5%-95%: 0.25-0.88; LFW/SFace: 0.66 ± 0.10, 0.48-0.81).

Generative model (all vectors in R^d, ``n(v) = v/|v|``)::

    spectrum  s_k ∝ (1 + k)^(-spectrum_decay / 2),  Σ s_k² = 1
    g         = common mean direction (unit)
    f_F       = n(s ⊙ z)                                    family centre
    c_i       = n(sqrt(mean_weight)·g + n(ρ_F f_F + sqrt(1-ρ_F²) n(s ⊙ z_i)))   identity centre
    m_im      = c_i + η_i · B w_im,   w_im ~ N(0, I_r / r)   mode centre (B: d×r shared nuisance basis)
    x         = n(m_im + σ_i e^{τ ζ} (s ⊙ z) + λ q g_lq)     face (q = 1 for low-quality faces)

with ρ_F² ~ U(family_cos), σ_i = spread_median · e^{spread_sigma · N(0,1)},
η_i = mode_scale · e^{0.3 N(0,1)}.

Determinism: everything is a function of ``(n_faces, seed, params)``. Faces are
generated in fixed internal blocks of :data:`BLOCK_ROWS` rows, each with its own
random stream, so the output does not depend on how a caller consumes the
blocks (streaming to disk or all at once give identical bytes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

import numpy as np

__all__ = ["BLOCK_ROWS", "SynthParams", "VARIANTS", "variant_params", "Identities", "make_identities",
           "split_identities", "face_blocks", "draw_sizes", "make_faces", "make_splits", "spectrum"]

#: rows per internal generation block (fixed: part of the output's definition)
BLOCK_ROWS = 65536

# stream tags for SeedSequence so that the different random draws never overlap
_TAG_WORLD, _TAG_IDS, _TAG_SPLIT, _TAG_ORDER, _TAG_FACES = 11, 13, 17, 19, 23


@dataclass(frozen=True)
class SynthParams:
    """Knobs of the generator (defaults calibrated so that one global threshold is clearly beaten).

    Attributes
    ----------
    dim : int
        Embedding dimension d.
    singleton_fraction : float
        Share of identities with exactly one face (LFW: 0.71 of people; MS1M tests: fewer).
    size_median : float
        Median size of non-singleton identities (log-normal, sizes >= 2).
    size_sigma : float
        Log-normal sigma of non-singleton identity sizes (larger: longer tail).
    max_size : int
        Largest identity (sizes are clipped).
    family_mean : float
        Mean number of identities per look-alike family (1 + geometric); 1 disables families.
    family_cos : tuple of float
        Range of the cosine between the centres of two identities of one family
        (uniform per family), before the common mean direction is added; with it
        the centre cosine is ``(mean_weight + c) / (1 + mean_weight)`` (defaults:
        0.54-0.75, unrelated identities ≈ 0.17). Faces are farther apart than
        centres: divide by about ``1 + σ² + η²``.
    mean_weight : float
        Squared weight of the common mean direction added to every identity centre
        (real embeddings are not centred): sets the mean impostor cosine (0.2 -> 0.08).
    spectrum_decay : float
        Variance of direction k ∝ (1+k)^-decay; 0 = isotropic. 0.6 gives an
        effective dimension ≈ 110 at d = 256 (impostor spread ≈ ±0.09).
    modes_mean : float
        Mean number of extra modes per identity (Poisson), capped by its size.
    mode_scale : float
        Median length of a mode offset relative to the (unit) identity centre.
    nuisance_dim : int
        Dimension r of the shared nuisance (pose/age/light) subspace modes move in.
    spread_median : float
        Median within-identity noise scale σ (same-mode genuine cosine ≈ 1/(1+σ²)).
    spread_sigma : float
        Log-normal sigma of σ across identities (identity-specific spread).
    face_sigma : float
        Log-normal sigma of a per-face factor on σ (face quality).
    lowq_fraction : float
        Share of faces that are low quality (pulled toward a shared direction).
    lowq_pull : float
        Length of that pull (relative to the unit identity centre).
    face_shift : float
        Length ``a`` of the common mean direction added to every finished (unit) face,
        which is then normalised again: every cosine moves toward 1, about
        ``cos -> (cos + a²) / (1 + a²)``, an almost monotone squeeze that leaves who is
        whose neighbour nearly unchanged (a face model with dlib's scale: a = 3 puts the
        kNN cosines at about 0.9-1). 0: off.
    """

    dim: int = 256
    singleton_fraction: float = 0.3
    size_median: float = 10.0
    size_sigma: float = 1.1
    max_size: int = 400
    family_mean: float = 3.0
    family_cos: tuple[float, float] = (0.45, 0.7)
    mean_weight: float = 0.2
    spectrum_decay: float = 0.6
    modes_mean: float = 1.5
    mode_scale: float = 0.55
    nuisance_dim: int = 24
    spread_median: float = 0.75
    spread_sigma: float = 0.45
    face_sigma: float = 0.2
    lowq_fraction: float = 0.04
    lowq_pull: float = 0.8
    face_shift: float = 0.0

    def __post_init__(self):
        checks = [
            (self.dim >= 8, "dim must be >= 8"),
            (0.0 <= self.singleton_fraction < 1.0, "singleton_fraction must be in [0, 1)"),
            (self.size_median >= 2, "size_median must be >= 2"),
            (self.size_sigma >= 0, "size_sigma must be >= 0"),
            (self.max_size >= 2, "max_size must be >= 2"),
            (self.family_mean >= 1, "family_mean must be >= 1"),
            (0.0 <= self.family_cos[0] <= self.family_cos[1] < 1.0, "family_cos must be 0 <= lo <= hi < 1"),
            (self.mean_weight >= 0, "mean_weight must be >= 0"),
            (self.spectrum_decay >= 0, "spectrum_decay must be >= 0"),
            (self.modes_mean >= 0, "modes_mean must be >= 0"),
            (self.mode_scale >= 0, "mode_scale must be >= 0"),
            (1 <= self.nuisance_dim <= self.dim, "nuisance_dim must be in [1, dim]"),
            (self.spread_median > 0, "spread_median must be > 0"),
            (self.spread_sigma >= 0 and self.face_sigma >= 0, "spread_sigma, face_sigma must be >= 0"),
            (0.0 <= self.lowq_fraction <= 1.0, "lowq_fraction must be in [0, 1]"),
            (self.lowq_pull >= 0, "lowq_pull must be >= 0"),
            (self.face_shift >= 0, "face_shift must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"SynthParams: {msg}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["family_cos"] = list(self.family_cos)
        return d


#: Named variants of the generator: each shifts one property a face model or a
#: photo collection changes, so that a method tuned on the default set can be tested
#: under that shift (``facecluster synth --variant NAME``, ``bench quality --variant NAME``).
#: Values are :class:`SynthParams` overrides; the measured facts are in the README.
VARIANTS: dict[str, dict] = {
    "default": {},
    # another face model's similarity scale: every cosine squeezed toward 1 (kNN cosines
    # about 0.93-1, like dlib's 0.88-0.99 on LFW); who neighbours whom is nearly unchanged
    "scale": {"face_shift": 3.0},
    # looser identities, and more unequal ones (genuine cosine ~0.5 instead of ~0.64)
    "spread": {"spread_median": 1.0, "spread_sigma": 0.6},
    # every identity has 2-30 faces (no singletons, no large identities): subsampled identities
    "sizes": {"singleton_fraction": 0.0, "size_median": 6.0, "size_sigma": 0.8, "max_size": 30},
    # large identities (median 80 faces) without look-alike families: most kNN pairs are
    # genuine, so the Otsu anchor splits inside the genuine mode and the label-chosen
    # threshold lies *below* the anchor (the default set has it above)
    "large": {"size_median": 80.0, "size_sigma": 0.5, "singleton_fraction": 0.0, "family_mean": 1.0},
}


def variant_params(name: str, dim: int = 256, **overrides) -> SynthParams:
    """The :class:`SynthParams` of a named variant (see :data:`VARIANTS`), with ``overrides`` on top."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}")
    return SynthParams(**{**VARIANTS[name], **overrides, "dim": dim})


def spectrum(dim: int, decay: float) -> np.ndarray:
    """Per-direction standard deviations ``s`` with ``Σ s² = 1`` and ``s_k² ∝ (1+k)^-decay``."""
    var = (1.0 + np.arange(dim, dtype=np.float64)) ** (-decay)
    return np.sqrt(var / var.sum())


def _unit_rows(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


@dataclass
class Identities:
    """The identities behind a dataset (no faces yet).

    Attributes
    ----------
    params : SynthParams
    seed : int
    sizes : numpy.ndarray
        Faces per identity (int64, sums to ``n_faces``); identity id = index.
    family : numpy.ndarray
        Family id of every identity (int64).
    centres : numpy.ndarray
        Identity centres (float32, [I, d], unit rows).
    spread : numpy.ndarray
        Within-identity noise scale σ_i (float32).
    mode_start, n_modes : numpy.ndarray
        Each identity's modes are rows ``mode_start[i] : mode_start[i] + n_modes[i]`` of
        ``mode_offsets``.
    mode_offsets : numpy.ndarray
        Mode offsets in nuisance coordinates (float32, [M, r]), already scaled by η_i.
    basis : numpy.ndarray
        Shared nuisance basis B (float32, [r, d], orthonormal rows).
    noise_std : numpy.ndarray
        Spectrum ``s`` (float32, [d]).
    lowq_dir : numpy.ndarray
        Shared low-quality direction (float32, [d], unit).
    mean_dir : numpy.ndarray
        The common mean direction g (float32, [d], unit).
    """

    params: SynthParams
    seed: int
    sizes: np.ndarray
    family: np.ndarray
    centres: np.ndarray
    spread: np.ndarray
    mode_start: np.ndarray
    n_modes: np.ndarray
    mode_offsets: np.ndarray
    basis: np.ndarray
    noise_std: np.ndarray
    lowq_dir: np.ndarray
    mean_dir: np.ndarray

    @property
    def n_faces(self) -> int:
        return int(self.sizes.sum())

    @property
    def n_identities(self) -> int:
        return int(self.sizes.shape[0])


def draw_sizes(n_faces: int, p: SynthParams, rng: np.random.Generator) -> np.ndarray:
    """Identity sizes summing exactly to ``n_faces`` (the last one truncated)."""
    mean_size = p.singleton_fraction + (1 - p.singleton_fraction) * p.size_median * np.exp(p.size_sigma**2 / 2)
    chunks, total = [], 0
    while total < n_faces:
        m = int(max(64, 1.2 * (n_faces - total) / mean_size))
        single = rng.random(m) < p.singleton_fraction
        big = np.exp(np.log(p.size_median) + p.size_sigma * rng.standard_normal(m))
        s = np.where(single, 1, np.clip(np.rint(big), 2, p.max_size)).astype(np.int64)
        chunks.append(s)
        total += int(s.sum())
    sizes = np.concatenate(chunks)
    cs = np.cumsum(sizes)
    last = int(np.searchsorted(cs, n_faces))  # first identity reaching n_faces
    sizes = sizes[: last + 1].copy()
    sizes[-1] -= int(cs[last] - n_faces)
    if p.singleton_fraction == 0 and sizes[-1] == 1 and len(sizes) > 1:
        # no singletons asked for: the truncated last identity takes a face from its neighbour
        # (or joins it when that one is at the minimum), so every identity keeps >= 2 faces
        if sizes[-2] > 2:
            sizes[-2] -= 1
            sizes[-1] = 2
        elif p.max_size > 2:
            sizes = np.concatenate([sizes[:-2], [sizes[-2] + 1]])
    return sizes


def make_identities(n_faces: int, seed: int = 0, params: SynthParams | None = None) -> Identities:
    """Draw the identities (sizes, families, centres, modes, spreads) for ``n_faces`` faces.

    Parameters
    ----------
    n_faces : int
        Total number of faces the identities hold (>= 1).
    seed : int
        Seed; same ``(n_faces, seed, params)`` gives identical identities.
    params : SynthParams, optional
        Generator knobs (defaults: :class:`SynthParams()`).

    Returns
    -------
    Identities
    """
    p = params or SynthParams()
    if n_faces < 1:
        raise ValueError(f"n_faces must be >= 1, got {n_faces}")
    d, r = p.dim, p.nuisance_dim
    s = spectrum(d, p.spectrum_decay)
    # world: directions shared by all identities (independent of n_faces so that the
    # train and test splits of any dataset size share the same "face model")
    world = np.random.default_rng(np.random.SeedSequence([seed, _TAG_WORLD]))
    mean_dir = _unit_rows((s * world.standard_normal(d))[None])[0]
    lowq_dir = _unit_rows(world.standard_normal((1, d)))[0]
    basis = np.linalg.qr(world.standard_normal((d, r)))[0].T  # r x d orthonormal rows

    rng = np.random.default_rng(np.random.SeedSequence([seed, _TAG_IDS]))
    sizes = draw_sizes(n_faces, p, rng)
    n_ids = sizes.shape[0]
    # families: consecutive runs of 1 + geometric identities (identity order is random anyway)
    fam_sizes = rng.geometric(1.0 / p.family_mean, size=n_ids)  # support >= 1, mean family_mean
    family = np.repeat(np.arange(n_ids), fam_sizes)[:n_ids].astype(np.int64)
    n_fam = int(family[-1]) + 1
    rho = np.sqrt(rng.uniform(p.family_cos[0], p.family_cos[1], n_fam))
    fam_centre = _unit_rows(s * rng.standard_normal((n_fam, d)))
    own = _unit_rows(s * rng.standard_normal((n_ids, d)))
    rf = rho[family][:, None]
    c = rf * fam_centre[family] + np.sqrt(1.0 - rf**2) * own
    c = _unit_rows(c)
    centres = _unit_rows(np.sqrt(p.mean_weight) * mean_dir + c).astype(np.float32)

    spread = (p.spread_median * np.exp(p.spread_sigma * rng.standard_normal(n_ids))).astype(np.float32)
    n_modes = np.minimum(1 + rng.poisson(p.modes_mean, n_ids), sizes).astype(np.int64)
    mode_start = np.concatenate([[0], np.cumsum(n_modes)[:-1]]).astype(np.int64)
    eta = p.mode_scale * np.exp(0.3 * rng.standard_normal(n_ids))
    w = rng.standard_normal((int(n_modes.sum()), r)) / np.sqrt(r)
    w *= np.repeat(eta, n_modes)[:, None]
    return Identities(params=p, seed=int(seed), sizes=sizes, family=family, centres=centres, spread=spread,
                      mode_start=mode_start, n_modes=n_modes, mode_offsets=w.astype(np.float32),
                      basis=basis.astype(np.float32), noise_std=s.astype(np.float32), lowq_dir=lowq_dir.astype(np.float32),
                      mean_dir=mean_dir.astype(np.float32))


def split_identities(ids: Identities, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Partition identity ids into (train, test), test holding ≈ ``test_fraction`` of the faces.

    Identities are taken in a seeded random order until the test side has at least
    ``test_fraction * n_faces`` faces; the two sides share no identity (families may
    span both, as look-alikes do in real data).
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    rng = np.random.default_rng(np.random.SeedSequence([ids.seed, _TAG_SPLIT]))
    order = rng.permutation(ids.n_identities)
    cs = np.cumsum(ids.sizes[order])
    n_test = int(np.searchsorted(cs, test_fraction * ids.n_faces, side="left")) + 1 if test_fraction > 0 else 0
    if test_fraction >= 1.0:
        n_test = ids.n_identities
    test = np.sort(order[:n_test])
    train = np.sort(order[n_test:])
    return train, test


def _face_labels(ids: Identities, identity_ids: np.ndarray, tag: int) -> np.ndarray:
    """Labels of all faces of ``identity_ids`` in a seeded random order (faces are not grouped by identity)."""
    labels = np.repeat(identity_ids.astype(np.int64), ids.sizes[identity_ids])
    rng = np.random.default_rng(np.random.SeedSequence([ids.seed, _TAG_ORDER, tag]))
    return labels[rng.permutation(labels.shape[0])]


def face_blocks(ids: Identities, labels: np.ndarray, tag: int = 0) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Generate the faces for ``labels`` block by block.

    Parameters
    ----------
    ids : Identities
    labels : numpy.ndarray
        Identity id of every face to generate (int64), in output order.
    tag : int
        Stream tag (different splits use different tags so their noise differs).

    Yields
    ------
    (start, features, labels) : (int, float32 [b, d] unit rows, int64 [b])
        Consecutive blocks of :data:`BLOCK_ROWS` rows (the last may be shorter).
    """
    p = ids.params
    n = labels.shape[0]
    s = ids.noise_std
    for b, start in enumerate(range(0, n, BLOCK_ROWS)):
        lab = labels[start:start + BLOCK_ROWS]
        m = lab.shape[0]
        rng = np.random.default_rng(np.random.SeedSequence([ids.seed, _TAG_FACES, tag, b]))
        mode = ids.mode_start[lab] + np.minimum((rng.random(m) * ids.n_modes[lab]).astype(np.int64), ids.n_modes[lab] - 1)
        sigma = ids.spread[lab] * np.exp(p.face_sigma * rng.standard_normal(m, dtype=np.float32))
        x = rng.standard_normal((m, p.dim), dtype=np.float32)
        x *= s
        x *= sigma[:, None]
        x += ids.centres[lab]
        x += ids.mode_offsets[mode] @ ids.basis
        lowq = rng.random(m) < p.lowq_fraction
        if lowq.any():
            pull = (p.lowq_pull * rng.uniform(0.5, 1.0, int(lowq.sum()))).astype(np.float32)
            x[lowq] += pull[:, None] * ids.lowq_dir
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        if p.face_shift > 0:
            x += np.float32(p.face_shift) * ids.mean_dir
            x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield start, x, lab


def make_faces(n: int, dim: int = 256, seed: int = 0, params: SynthParams | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All faces of ``n`` faces' worth of identities, in random order.

    Parameters
    ----------
    n : int
        Number of faces.
    dim : int
        Embedding dimension (overrides ``params.dim``).
    seed : int
    params : SynthParams, optional

    Returns
    -------
    features : numpy.ndarray, float32 [n, dim], L2-normalised rows
    labels : numpy.ndarray, int64 [n], identity ids
    """
    p = dataclasses.replace(params or SynthParams(), dim=dim)
    ids = make_identities(n, seed, p)
    labels = _face_labels(ids, np.arange(ids.n_identities), tag=0)
    return _collect(ids, labels, tag=0)


def _collect(ids: Identities, labels: np.ndarray, tag: int) -> tuple[np.ndarray, np.ndarray]:
    out = np.empty((labels.shape[0], ids.params.dim), np.float32)
    for start, x, _ in face_blocks(ids, labels, tag):
        out[start:start + x.shape[0]] = x
    return out, labels


def split_labels(ids: Identities, test_fraction: float) -> dict[str, np.ndarray]:
    """Face labels (in output order) of the train and test splits: ``{"train": ..., "test": ...}``."""
    train, test = split_identities(ids, test_fraction)
    return {"train": _face_labels(ids, train, tag=1), "test": _face_labels(ids, test, tag=2)}


#: stream tag of each split's faces
SPLIT_TAGS = {"train": 1, "test": 2}


def make_splits(n: int, dim: int = 256, seed: int = 0, test_fraction: float = 0.5,
                params: SynthParams | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A train and a test set with disjoint identities (same face model, same families).

    Parameters
    ----------
    n : int
        Total faces over both splits.
    dim, seed, params :
        As :func:`make_faces`.
    test_fraction : float
        Approximate share of faces in the test split (whole identities are assigned).

    Returns
    -------
    dict
        ``{"train": (features, labels), "test": (features, labels)}``.
    """
    p = dataclasses.replace(params or SynthParams(), dim=dim)
    ids = make_identities(n, seed, p)
    return {name: _collect(ids, lab, SPLIT_TAGS[name]) for name, lab in split_labels(ids, test_fraction).items()}


# -- the general model's training worlds --------------------------------------------------------
#: identity-size laws the general model trains over (cycled, so every law is in every recipe of >= 4 worlds):
#: a long tail with singletons (LFW-like), every identity of 2-30 faces (subsampled identities), mostly
#: one- and two-face people, and large identities of tens to hundreds of faces.
SIZE_LAWS = ("long_tail", "small", "singletons", "large")
#: feature dimensions the general model trains over (cycled; no face model's dimension is special)
WORLD_DIMS = (128, 32, 512, 256, 96, 192)


def _size_law(law: str, rng: np.random.Generator) -> dict:
    if law == "long_tail":
        return {"singleton_fraction": rng.uniform(0.1, 0.5), "size_median": rng.uniform(4.0, 20.0),
                "size_sigma": rng.uniform(0.6, 1.3), "max_size": 400}
    if law == "small":
        return {"singleton_fraction": 0.0, "size_median": rng.uniform(3.0, 10.0), "size_sigma": rng.uniform(0.5, 1.0),
                "max_size": 30}
    if law == "singletons":
        return {"singleton_fraction": rng.uniform(0.5, 0.8), "size_median": rng.uniform(2.0, 5.0),
                "size_sigma": rng.uniform(0.5, 1.0), "max_size": 100}
    if law == "large":
        return {"singleton_fraction": rng.uniform(0.0, 0.1), "size_median": rng.uniform(30.0, 100.0),
                "size_sigma": rng.uniform(0.3, 0.7), "max_size": 400}
    raise ValueError(f"unknown size law {law!r}; choose one of {', '.join(SIZE_LAWS)}")


def general_worlds(n_worlds: int, seed: int = 0) -> list[tuple[str, SynthParams]]:
    """``n_worlds`` randomised generator settings for the general model: (size law, :class:`SynthParams`).

    World ``i`` takes size law ``SIZE_LAWS[i % 4]`` and dimension ``WORLD_DIMS[i % 6]``;
    everything else is drawn from its own seeded stream, in broad ranges around the
    generator's defaults: the similarity scale (``face_shift`` 0 in a third of the worlds,
    else 0.5-4: kNN cosines from ~0.3-0.9 up to ~0.95-1; ``mean_weight``,
    ``spectrum_decay``), the within-identity spread and its inequality, modes, families
    (none to large ones, loose to close look-alikes) and low-quality faces. A function of
    ``(n_worlds, seed)`` only.
    """
    out = []
    for i in range(n_worlds):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 29, i]))
        law = SIZE_LAWS[i % len(SIZE_LAWS)]
        lo = rng.uniform(0.3, 0.65)
        p = {**_size_law(law, rng),
             "face_shift": 0.0 if rng.random() < 1 / 3 else rng.uniform(0.5, 4.0),
             "mean_weight": rng.uniform(0.05, 0.6), "spectrum_decay": rng.uniform(0.3, 1.0),
             "spread_median": rng.uniform(0.5, 1.1), "spread_sigma": rng.uniform(0.2, 0.7),
             "face_sigma": rng.uniform(0.1, 0.3), "modes_mean": rng.uniform(0.5, 2.5),
             "mode_scale": rng.uniform(0.3, 0.8), "family_mean": rng.uniform(1.0, 5.0),
             "family_cos": (lo, min(0.9, lo + rng.uniform(0.05, 0.3))),
             "lowq_fraction": rng.uniform(0.0, 0.08), "lowq_pull": rng.uniform(0.4, 1.0)}
        dim = WORLD_DIMS[i % len(WORLD_DIMS)]
        out.append((law, SynthParams(dim=dim, nuisance_dim=min(24, dim), **{k: (float(v) if isinstance(v, np.floating) else v)
                                                                                 for k, v in p.items()})))
    return out
