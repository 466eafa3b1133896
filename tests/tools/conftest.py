import sys
from pathlib import Path

# the tools are scripts beside the package, not modules of it: their tests import them by file name
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
