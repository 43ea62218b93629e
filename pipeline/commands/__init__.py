"""Click commands, one module per command (loaded lazily by :mod:`facecluster.pipeline.cli`)."""
