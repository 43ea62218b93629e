"""facecluster's Dask layer (``facecluster.pipeline``): run store, configuration, cluster connection,
stages, clustering methods, training, the Python API, CLI, reports.

The numerical work lives in :mod:`facecluster.tasks` (pure kernels); this package only opens
stores, builds Dask graphs over chunks and schedules kernels.
"""

__version__ = "0.7.13"
