"""facecluster's Dask layer: run store, configuration, cluster connection, stages, CLI, reports.

The numerical work lives in :mod:`tasks` (pure kernels); this package only opens
stores, builds Dask graphs over chunks and schedules kernels.
"""

__version__ = "0.2.0"
