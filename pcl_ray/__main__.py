"""``python -m pcl_ray ...``: the same command line as the ``pcl-ray`` console script and ``run.py``."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
