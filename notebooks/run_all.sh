#!/usr/bin/env bash
# Re-execute every notebook in this folder in place (outputs are committed).
# Usage: notebooks/run_all.sh [notebook.ipynb ...]   (default: all of notebooks/*.ipynb)
# Uses the project's virtual environment (.venv, or $PYTHON) and its ipykernel; one
# torch thread, as the networks are tiny.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [ "$#" -eq 0 ]; then set -- notebooks/*.ipynb; fi
for nb in "$@"; do
  echo "executing $nb"
  start=$(date +%s)
  "$PYTHON" - "$nb" <<'PY'
import sys
import nbformat
from nbclient import NotebookClient

path = sys.argv[1]
nb = nbformat.read(path, as_version=4)
NotebookClient(nb, timeout=1800, kernel_name="python3",
               resources={"metadata": {"path": "notebooks"}}).execute()
nbformat.write(nb, path)
PY
  echo "  done in $(( $(date +%s) - start ))s"
done
