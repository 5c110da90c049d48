"""O(3)-invariant classification of UTKinect skeletons with Deep Equivariant Hyperspheres.

With no arguments this runs the paper's configuration; see `python o3_skeletons.py --help`.
"""

import sys

from engineer.runner import main

if __name__ == "__main__":
    sys.exit(main("skeletons"))
