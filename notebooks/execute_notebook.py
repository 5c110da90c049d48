"""Execute a notebook with the current Python interpreter, and optionally save it with outputs.

The kernel is started as ``sys.executable -m ipykernel_launcher`` from a temporary kernel spec,
so no Jupyter kernel needs to be installed and the notebook sees the same packages as the
caller. The kernel starts in the notebook's folder.

Usage, from the repository root::

    python notebooks/execute_notebook.py notebooks/equivariant_hyperspheres_demo.ipynb

rewrites the notebook in place with fresh outputs.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

KERNEL_NAME = "python3"


def execute(path: Path, timeout: int = 120) -> nbformat.NotebookNode:
    """Run every cell of the notebook at ``path`` and return it with outputs.

    Raises ``nbclient.exceptions.CellExecutionError`` if a cell fails.
    """
    path = Path(path).resolve()
    notebook = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as kernels:
        spec_dir = Path(kernels) / KERNEL_NAME
        spec_dir.mkdir()
        spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (current interpreter)", "language": "python"}
        (spec_dir / "kernel.json").write_text(json.dumps(spec))
        specs = KernelSpecManager(kernel_dirs=[kernels])
        manager = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)
        client = NotebookClient(notebook, km=manager, timeout=timeout,
                                resources={"metadata": {"path": str(path.parent)}})
        client.execute()
    return notebook


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path)
    args = parser.parse_args()
    nbformat.write(execute(args.notebook), args.notebook)


if __name__ == "__main__":
    main()
