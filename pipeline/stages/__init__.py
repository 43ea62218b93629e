"""One module per pipeline stage. A stage imports kernels from :mod:`tasks` and the
store/config/cluster modules of :mod:`pipeline`, never another stage."""
