"""facecluster: cluster face embeddings into identities by learning to cluster, on Dask.

The Python API (the functions the ``facecluster`` command line calls, in the same order):

* :class:`FaceClusterer` — ``fit(X)`` / ``fit_predict(X)``, ``labels_``, ``scores_``, ``run_``;
* :func:`train` — a model (edge scorer, GCN-D, GCN-S) from labelled faces;
* :func:`open_run` — an existing run store (``labels``, ``scores``, ``evaluate()``).

Every installed import name lives under this package:

* :mod:`facecluster.tasks` — pure compute kernels (numpy/scipy/faiss/torch in, numpy out);
  the repository's ``tasks/`` folder.
* :mod:`facecluster.pipeline` — the Dask layer (run store, configuration, cluster
  connection, stages, training, CLI); the repository's ``pipeline/`` folder.

The two folders are mapped under this name by the packaging (``pyproject.toml``,
``[tool.setuptools.package-dir]``), so a ``tasks.py`` or ``pipeline.py`` in the
working directory never shadows them.
"""

from facecluster.pipeline import __version__
from facecluster.pipeline.api import FaceClusterer, Run, open_run, train
from facecluster.pipeline.config import Config

__all__ = ["Config", "FaceClusterer", "Run", "__version__", "open_run", "train"]
