"""Convex hull volumes of 16 points in 5D with Deep Equivariant Hyperspheres.

With no arguments this runs the paper's configuration; see `python hulls.py --help`.
"""

import sys

from engineer.runner import main

if __name__ == "__main__":
    sys.exit(main("hulls"))
