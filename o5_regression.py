"""O(5)-invariant regression on pairs of 5D points with Deep Equivariant Hyperspheres.

With no arguments this runs the paper's configuration; see `python o5_regression.py --help`.
"""

import sys

from engineer.runner import main

if __name__ == "__main__":
    sys.exit(main("o5_regression"))
