"""``python -m facecluster``: the same command line as the ``facecluster`` console script."""

from facecluster.pipeline.cli import main

if __name__ == "__main__":
    main()
