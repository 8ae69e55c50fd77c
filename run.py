#!/usr/bin/env python
"""pcl-ray entry point. All logic lives in pcl_ray; see `python run.py --help`."""

from pcl_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
