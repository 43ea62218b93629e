"""The Python API: :class:`FaceClusterer`, :func:`train` and :func:`open_run` (exported by ``facecluster``).

It calls the functions the command line calls, in the same order: ``run_ingest`` (the
``ingest`` command), :func:`facecluster.pipeline.methods.check_method` and
:func:`~facecluster.pipeline.methods.run_method` (``cluster``), and
:func:`facecluster.pipeline.train.train` (``train``), on a Dask cluster connected as the
CLI connects (:func:`facecluster.pipeline.cluster.connect`) unless a ``Client`` is given.
So ``FaceClusterer(method="threshold").fit_predict(X)`` gives the labels of
``facecluster ingest X.npy -o RUN.zarr && facecluster cluster RUN.zarr --method threshold`` (and
``method="infomap"`` those of ``--method infomap``).

Heavy modules (Dask, zarr, torch, faiss) are imported when a function runs, so that
``import facecluster`` and ``facecluster --help`` stay fast.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .config import Config
from .errors import BadInput

log = logging.getLogger(__name__)

# API method name -> the CLI's `--method` (the learned method is "gcn" there)
METHOD_NAMES = {"learned": "gcn", "gcn": "gcn", "threshold": "threshold", "infomap": "infomap"}
BLOCK_BYTES = 32 << 20  # rows of an array-like input copied per block


# -- run stores ----------------------------------------------------------------------
class Run:
    """A run store written by ``facecluster`` (the CLI or this API), opened for reading.

    Parameters
    ----------
    url : str or path-like
        The run store: a local path (``RUN.zarr``) or an fsspec URL (``s3://bucket/run.zarr``).

    Attributes
    ----------
    url : str
        The run store's normalised URL (local paths absolute).
    store : facecluster.pipeline.store.RunStore
        The store itself (arrays, stage records), for anything this class does not cover.

    Raises
    ------
    ValueError
        ``url`` is not a facecluster run store.
    """

    def __init__(self, url: str | os.PathLike):
        from .store import RunStore, StoreError

        try:
            self.store = RunStore.open(url, mode="r")
        except StoreError as e:
            raise BadInput(f"{url}: cannot open the run store ({e})") from None
        self.url = self.store.url

    def __repr__(self) -> str:
        return f"Run({self.url!r})"

    @property
    def n_faces(self) -> int:
        """Faces stored in the run (input rows that ingest kept)."""
        self.store.require("ingest", "ingest features into it first")
        return int(self.store.array("features").shape[0])

    @property
    def input_rows(self) -> np.ndarray:
        """The input row (of ``X``) of every stored face, int64; ``arange(n)`` unless rows were dropped."""
        self.store.require("ingest", "ingest features into it first")
        return np.asarray(self.store.array("input_rows")[:], dtype=np.int64)

    @property
    def labels(self) -> np.ndarray:
        """The cluster id of every stored face (int64, ``clusters``; unclustered faces are singletons).

        Raises
        ------
        ValueError
            The run was never clustered, or its clustering is stale (its inputs changed since).
        """
        from .export import load_clusters

        return load_clusters(self.store)

    @property
    def scores(self) -> np.ndarray | None:
        """The confidence of every face's cluster, or None when the method stores none.

        The learned method stores, per face, the predicted IoU (GCN-D) of the proposal whose
        cluster the face joined (``clusters_score``, float32 in [0, 1]); NaN for a face no
        proposal claimed (a singleton, or a face attached to its most probable neighbour's
        cluster). The threshold method stores no score (None).
        """
        from .export import find_score

        return find_score(self.store, int(self.store.array("clusters").shape[0]))[1] if self.store.has("clusters") else None

    def stages(self) -> dict[str, dict]:
        """Every stage's summary as recorded in the store (name -> summary), in the order they finished."""
        recs = sorted(self.store.records().items(), key=lambda kv: str(kv[1].get("finished", "")))
        return {name: rec.get("summary", {}) for name, rec in recs if rec.get("complete")}

    def evaluate(self, y: Any = None) -> dict:
        """Pairwise / BCubed precision, recall, F and NMI of the stored clustering.

        Parameters
        ----------
        y : array-like or path, optional
            Ground-truth identity of every stored face (default: the labels ingested with the run).

        Returns
        -------
        dict
            The metrics of :func:`facecluster.tasks.metrics.evaluate`.
        """
        from facecluster.tasks.io import read_labels
        from facecluster.tasks.metrics import evaluate

        pred = self.labels
        if y is None:
            if not self.store.has("labels"):
                raise BadInput(f"{self.url}: the run holds no ground-truth labels; pass y")
            gt = np.asarray(self.store.array("labels")[:], dtype=np.int64)
        elif isinstance(y, (str, os.PathLike)):
            gt = read_labels(y, option="y")
        else:
            gt = np.asarray(y)
        if gt.ndim != 1 or gt.shape[0] != pred.shape[0]:
            raise BadInput(f"y has shape {gt.shape}; expected one label per stored face ({pred.shape[0]},)")
        return evaluate(gt.astype(np.int64), pred)


def open_run(url: str | os.PathLike) -> Run:
    """Open an existing run store (written by ``facecluster cluster`` or :class:`FaceClusterer`).

    Parameters
    ----------
    url : str or path-like
        ``RUN.zarr`` or an fsspec URL.

    Returns
    -------
    Run
        ``.labels`` (cluster id per face), ``.scores``, ``.input_rows``, ``.evaluate()``, ``.stages()``.

    Examples
    --------
    >>> run = facecluster.open_run("run.zarr")          # doctest: +SKIP
    >>> run.labels[:5], run.evaluate()["pairwise_f"]    # doctest: +SKIP
    """
    return Run(url)


# -- inputs ----------------------------------------------------------------------------
def make_config(config: Any = None, k: int | None = None) -> Config:
    """The configuration of a call: ``config`` (None, a :class:`Config`, a dict of sections or a TOML
    path) with ``k`` (the kNN's neighbours per face) on top when given."""
    if config is None:
        cfg = Config()
    elif isinstance(config, Config):
        cfg = config
    elif isinstance(config, dict):
        cfg = Config.from_dict(config)
    elif isinstance(config, (str, os.PathLike)):
        cfg = Config.load(config)
    else:
        raise ValueError(f"config must be None, a facecluster Config, a dict of sections or a TOML file path, "
                         f"not {type(config).__name__}")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer (neighbours per face), got {k!r}")
        cfg = Config.from_dict(cfg.to_dict(), {"knn.k": int(k)})
    return cfg


def _is_path(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


def _write_rows(x: Any, path: Path) -> None:
    """An array-like ``x`` (NumPy, Dask, Zarr, anything sliceable by rows) as ``path`` (.npy), block by block."""
    shape = tuple(getattr(x, "shape", ()))
    if len(shape) != 2:
        raise BadInput(f"X must be a 2-D array (faces x dimensions) or a feature file path, got shape {shape}")
    dtype = np.dtype(getattr(x, "dtype", np.float32))
    if dtype.kind not in "fiu":
        raise BadInput(f"X has dtype {dtype}; face features must be numbers (float32 preferred)")
    if isinstance(x, np.ndarray):
        np.save(path, x)
        return
    n, d = shape
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, d))
    rows = max(1, BLOCK_BYTES // max(1, d * dtype.itemsize))
    chunks = getattr(x, "chunks", None)
    if chunks and isinstance(chunks[0], (int, np.integer)):
        rows = max(int(chunks[0]), rows // int(chunks[0]) * int(chunks[0]))  # whole Zarr chunks per read
    for r0 in range(0, n, rows):
        out[r0:r0 + rows] = np.asarray(x[r0:r0 + rows])  # a Dask array computes its rows here
    out.flush()
    del out


def _write_labels(y: Any, path: Path) -> None:
    y = np.asarray(y)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise BadInput(f"y must be a 1-D array of integer identity labels, got dtype {y.dtype} shape {y.shape}")
    np.save(path, y.astype(np.int64))


def ingest(X: Any, url: str, y: Any = None, cfg: Config | None = None) -> dict:
    """``facecluster ingest`` of ``X`` (and ``y``) into the run store ``url``; the ingest stage's summary.

    A path goes to the ingest stage as it is (any format it reads: .npy, .npz, .bin, .zarr,
    .parquet); an array is first written to a temporary .npy, block by block, and that
    file is ingested. Messages about that file name ``X`` instead.
    """
    from .stages.ingest import run_ingest

    cfg = cfg or Config()
    with _as_files(X, y, "X", "y") as (src, labels):
        return run_ingest(src, url, labels=labels, cfg=cfg.ingest)


@contextlib.contextmanager
def _as_files(X, y, x_name: str, y_name: str, fixes: dict | None = None):
    """``X`` (and ``y``) as paths: a path as it is, an array written to a temporary .npy block by block.

    A BadInput raised inside names them ``x_name`` / ``y_name`` instead of the temporary files, and
    gives the API's fix for the CLI's (``fixes``: more CLI -> API replacements).
    """
    with tempfile.TemporaryDirectory(prefix="facecluster-input-") as tmp:
        x_tmp, y_tmp = Path(tmp) / f"{x_name}.npy", Path(tmp) / f"{y_name}.npy"
        src = X if _is_path(X) else x_tmp
        labels = y if y is None or _is_path(y) else y_tmp
        if not _is_path(X):
            _write_rows(X, src)
        if y is not None and not _is_path(y):
            _write_labels(y, labels)
        try:
            yield src, labels
        except BadInput as e:
            msg = str(e).replace(str(x_tmp), x_name).replace(str(y_tmp), y_name)
            for cli, api in {"pass --drop-invalid": "set config {'ingest': {'drop_invalid': True}}", **(fixes or {})}.items():
                msg = msg.replace(cli, api)
            raise BadInput(msg) from None


@contextlib.contextmanager
def connected(client, cfg: Config, url: str) -> Iterator[Any]:
    """The user's ``client`` (its workers checked as at connect: facecluster code, packages) or a cluster
    connected as the CLI does (``cfg.dask``: LocalCluster by default); every worker must reach ``url``."""
    from .cluster import check_store_reachable, check_workers, connect

    if client is not None:
        check_workers(client)
        check_store_reachable(client, url)
        yield client
        return
    with connect(cfg.dask, quiet=True) as own:
        check_store_reachable(own, url)
        yield own


@contextlib.contextmanager
def _store_url(store: str | os.PathLike | None) -> Iterator[str]:
    """``store`` (a run store path or URL), or ``run.zarr`` in a temporary directory removed on exit."""
    if store is not None:
        yield str(store)
        return
    with tempfile.TemporaryDirectory(prefix="facecluster-run-") as tmp:
        yield str(Path(tmp) / "run.zarr")


# -- training ---------------------------------------------------------------------------
def train(X: Any, y: Any, out: str | os.PathLike, *, config: Any = None, k: int | None = None, client=None,
          store: str | os.PathLike | None = None) -> Path:
    """Train a model (edge scorer, GCN-D, GCN-S) on labelled faces: ``facecluster train``.

    Parameters
    ----------
    X : ndarray, dask.array.Array, zarr.Array or path
        N x d face features of one face model (any format ``facecluster ingest`` reads).
    y : array-like or path
        The identity of every face (N integers; a path: ``.npy`` or ``.meta``).
    out : path
        The model directory to write (``gcnd.pt``, ``gcns.pt``, ``edges.pt``, ``config.json``;
        ``config.json`` holds the validation metrics).
    config : Config, dict, path or None
        Stage and training parameters (``facecluster config show`` lists them).
    k : int, optional
        Neighbours per face (default: the configuration's ``[knn] k``, 80).
    client : distributed.Client, optional
        Where the stages run (default: a LocalCluster as the CLI starts).
    store : path or URL, optional
        The run store to ingest into and keep (default: a temporary one, removed afterwards).

    Returns
    -------
    pathlib.Path
        ``out``: pass it as ``FaceClusterer(model=...)``.

    Raises
    ------
    ValueError
        Bad input (features, labels, configuration), one message naming it.
    """
    from .store import RunStore
    from .train import train as train_model

    if y is None:
        raise ValueError("train needs y, the identity label of every face (a 1-D integer array or a .npy/.meta path)")
    cfg = make_config(config, k)
    with _store_url(store) as url:
        ingest(X, url, y, cfg)
        run = RunStore.open(url)
        if not run.has("labels"):
            raise BadInput(f"{url}: the run holds no labels; pass y")
        with connected(client, cfg, run.url) as c:
            train_model(run, out, cfg, c, echo=log.info)
    return Path(out)


# -- clustering ---------------------------------------------------------------------------
class FaceClusterer:
    """Cluster face embeddings into identities, as ``facecluster cluster`` does.

    Parameters
    ----------
    model : path, optional
        A model directory written by :func:`train` or ``facecluster train``. The learned method
        without one runs the general model shipped in the package (trained on generated faces
        only, ``facecluster train --general``; any feature dimension); ``model_`` names the model
        a fit used. Optional for ``"infomap"`` (its edge scorer's probabilities become the
        weights; without one, the cosine).
    method : {"learned", "threshold", "infomap"}
        ``"learned"`` (the CLI's ``--method gcn``; also accepted as ``"gcn"``): knn -> learned
        edge probabilities -> communities -> proposals -> GCN-D -> GCN-S -> dedup.
        ``"threshold"``: the baseline, connected components of the kNN graph at one cut: the
        kNN edges with P(same identity) >= the cut the general model recorded in training (its edge
        scorer), or at the cosine ``th`` when given.
        ``"infomap"``: the map equation on the kNN graph, one Dask task per group of connected
        components: cosine weights at ``min_sim`` derived from the data (where the general model's
        edge probability crosses the level it chose in training), or with ``model`` the learned
        edge probabilities at the model's floor.
    k : int, optional
        Neighbours per face (default: the configuration's ``[knn] k``, 80).
    config : Config, dict, path or None
        Every stage's parameters: a :class:`facecluster.pipeline.config.Config`, a dict of
        sections (``{"knn": {"k": 30}}``) or a TOML file (``facecluster config show``).
    client : distributed.Client, optional
        Run on this Dask cluster (default: a LocalCluster sized to the machine, or the
        configuration's ``[dask]`` scheduler, as the CLI). Its workers must reach the run store.
    store : path or URL, optional
        The run store to write and keep (default: a temporary directory that lives as long
        as this object). Name one on a shared filesystem or object storage for a remote cluster.
    th : float, optional
        Threshold method: the cosine similarity threshold (default: none; the components of the kNN
        edges with P(same identity) >= the cut the general model recorded in training).
    max_size : int, optional
        Threshold method: split components larger than this (Algorithm 1; default: no split).
    min_sim : float, optional
        Infomap method: the edge floor (default: derived from the data, or the model's floor); it
        must lie within the range of the run's kNN similarities (edge probabilities with a model).

    Attributes
    ----------
    labels_ : ndarray of int64, shape (n_samples,)
        The cluster id of every row of ``X``; every face is labelled (unclustered faces are
        singletons). -1 only for rows that ingest dropped (``[ingest] drop_invalid``).
    scores_ : ndarray of float32, shape (n_samples,), or None
        The learned method's confidence: the predicted IoU (GCN-D) of the proposal whose
        cluster the face joined, in [0, 1]; NaN for faces no proposal claimed (singletons
        and faces attached to a neighbour's cluster). None for the threshold and infomap methods.
    run_ : Run
        The run store this fit wrote (``run_.url``; every stage's arrays and records).
    summary_ : dict
        The method's summary (clusters, singletons, and for the learned method what each stage did).

    Examples
    --------
    >>> import facecluster
    >>> labels = facecluster.FaceClusterer(method="threshold").fit_predict(X)   # doctest: +SKIP
    >>> model = facecluster.train(X_train, y_train, out="model/")                # doctest: +SKIP
    >>> fc = facecluster.FaceClusterer(model=model).fit(X)                       # doctest: +SKIP
    >>> fc.labels_, fc.scores_, fc.run_.url                                      # doctest: +SKIP
    """

    def __init__(self, model: str | os.PathLike | None = None, method: str = "learned", k: int | None = None,
                 config: Any = None, client=None, store: str | os.PathLike | None = None, th: float | None = None,
                 max_size: int | None = None, min_sim: float | None = None):
        self.model = model
        self.method = method
        self.k = k
        self.config = config
        self.client = client
        self.store = store
        self.th = th
        self.max_size = max_size
        self.min_sim = min_sim
        self._tmp: tempfile.TemporaryDirectory | None = None

    def __repr__(self) -> str:
        return f"FaceClusterer(model={self.model!r}, method={self.method!r}, k={self.k!r}, store={self.store!r})"

    def _cli_method(self) -> str:
        if self.method not in METHOD_NAMES:
            raise ValueError(f"method={self.method!r}: choose one of {', '.join(sorted(METHOD_NAMES))}")
        method = METHOD_NAMES[self.method]
        if method in ("gcn", "infomap") and self.model is not None and not Path(self.model).is_dir():
            raise ValueError(f"model={str(self.model)!r}: no such model directory (train one with facecluster.train)")
        for name, owner in (("th", "threshold"), ("max_size", "threshold"), ("min_sim", "infomap")):
            if getattr(self, name) is not None and method != owner:
                raise ValueError(f"{name} is a parameter of method={owner!r}, not of method={self.method!r}")
        return method

    def _url(self) -> str:
        if self.store is not None:
            return str(self.store)
        self._tmp = tempfile.TemporaryDirectory(prefix="facecluster-run-")  # the previous fit's is removed
        return str(Path(self._tmp.name) / "run.zarr")

    def fit(self, X: Any, y: Any = None) -> "FaceClusterer":
        """Cluster the faces of ``X``.

        Parameters
        ----------
        X : ndarray, dask.array.Array, zarr.Array or path
            N x d face features (N >= 2): an array (written block by block to the run store, a
            Dask array computed block by block) or a path of any format ``facecluster ingest``
            reads (.npy, .npz, .bin, .zarr, .parquet).
        y : array-like or path, optional
            Ground-truth identities, stored with the run (``run_.evaluate()``); not used to cluster.

        Returns
        -------
        FaceClusterer
            ``self``, with ``labels_``, ``scores_``, ``run_`` and ``summary_`` set.

        Raises
        ------
        ValueError
            Bad input: an unknown method, a model for
            another feature dimension, X not N x d numbers, NaN/inf or all-zero rows, y of
            another length, an unusable configuration. One message naming the problem.
        """
        from .methods import check_method, model_for, run_method
        from .store import RunStore

        method = self._cli_method()
        cfg = make_config(self.config, self.k)
        url = self._url()
        ingest(X, url, y, cfg)
        store = RunStore.open(url)
        model, used = model_for(method, None if self.model is None else str(self.model), self.th)
        check_method(store, method, model, self.min_sim)
        if used:
            log.info(used)
        self.model_ = model
        options = {"model": model, "th": self.th, "max_size": self.max_size,
                   "min_sim": self.min_sim, "force": False}
        with store.writing("cluster"), connected(self.client, cfg, store.url) as client:
            self.summary_ = run_method(store, cfg, client, method, options, echo=log.info)
        self.run_ = Run(store.url)
        n_input = int(store.record("ingest")["summary"].get("n_input", self.run_.n_faces))
        rows = self.run_.input_rows
        labels, scores = self.run_.labels, self.run_.scores
        self.labels_ = labels if len(rows) == n_input else _by_input_row(labels, rows, n_input, -1)
        self.scores_ = scores if scores is None or len(rows) == n_input else _by_input_row(scores, rows, n_input, np.nan)
        return self

    def fit_predict(self, X: Any, y: Any = None) -> np.ndarray:
        """:meth:`fit`, then ``labels_``: the cluster id of every row of ``X`` (int64)."""
        return self.fit(X, y).labels_

    def add(self, X_new: Any, y_new: Any = None) -> "FaceClusterer":
        """Add faces to the fitted clustering, re-clustering only what they touch (``facecluster add``).

        Parameters
        ----------
        X_new : ndarray, dask.array.Array, zarr.Array or path
            M x d features of the new faces (same face model, same d as the fitted ``X``).
        y_new : array-like or path, optional
            Their identities, stored beside the run's labels (``run_.evaluate()``).

        Returns
        -------
        FaceClusterer
            ``self``: ``labels_`` and ``scores_`` now cover every row of ``X`` and then every row of each
            added ``X_new`` in order; every old face whose cluster's members did not change keeps its id.
            ``add_summary_``: what the add did (faces re-clustered, ids kept, time per step).

        Raises
        ------
        ValueError
            Nothing fitted yet, or bad input (another dimension, NaN/inf rows), one message naming it.
        """
        from .additions import finish_add, prepare_add
        from .store import RunStore

        if getattr(self, "run_", None) is None:
            raise ValueError("add needs a fitted FaceClusterer: call fit(X) first (or open the run store with store=...)")
        cfg = make_config(self.config, self.k)
        store = RunStore.open(self.run_.url)
        model = None if self.model is None else str(self.model)
        with _as_files(X_new, y_new, "X_new", "y_new", {"(--model DIR)": "(FaceClusterer(model=...))"}) as (src, labels):
            with store.writing("add"):
                add = prepare_add(store, str(src), cfg, model, None if labels is None else str(labels), log.info)
                self.add_summary_ = add.skipped
                if add.skipped is None:
                    with connected(self.client, cfg, store.url) as client:
                        self.add_summary_ = finish_add(store, add, cfg, client, model, log.info)
        self.run_ = Run(store.url)
        rows = self.run_.input_rows
        n_input = int(rows.max()) + 1 if len(rows) else 0
        labels_, scores = self.run_.labels, self.run_.scores
        self.labels_ = labels_ if len(rows) == n_input else _by_input_row(labels_, rows, n_input, -1)
        self.scores_ = scores if scores is None or len(rows) == n_input else _by_input_row(scores, rows, n_input, np.nan)
        return self


def _by_input_row(values: np.ndarray, rows: np.ndarray, n_input: int, fill) -> np.ndarray:
    out = np.full(n_input, fill, dtype=values.dtype)
    out[rows] = values
    return out


__all__ = ["FaceClusterer", "Run", "open_run", "train"]
