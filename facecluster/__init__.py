"""facecluster: cluster face embeddings into identities by learning to cluster, on Dask.

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

__all__ = ["__version__"]
