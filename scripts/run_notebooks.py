"""Execute course notebooks top to bottom in place, as committed: outputs and execution counts
kept, widget state stripped (it is large and differs per run), timing printed per notebook.

    python scripts/run_notebooks.py                      # every notebooks/*.ipynb
    python scripts/run_notebooks.py notebooks/00_quickstart.ipynb

Each notebook must finish in under 2 minutes on 2 CPU cores; this script fails past 180 s per
cell and reports the total time so a slow notebook is noticed before it is committed.
"""

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


def run(path: Path) -> float:
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    timeout = int(os.environ.get("MINILLAMA4_CELL_TIMEOUT", "180"))
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    elapsed = time.perf_counter() - start
    nb.metadata.pop("widgets", None)  # widget state: large, per run, not needed to read the outputs
    for cell in nb.cells:
        cell.metadata.pop("execution", None)  # timestamps would change every run
    nbformat.write(nb, path)
    return elapsed


def main(argv: list[str]) -> int:
    paths = [Path(p) for p in argv] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    for path in paths:
        elapsed = run(path)
        flag = "  <-- over the 2-minute budget" if elapsed > 120 else ""
        print(f"{path.name}: {elapsed:.1f} s{flag}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
