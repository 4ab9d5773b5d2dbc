"""The experiment scripts import each other as top-level modules (`import expkit`), as they do when run as
`python tools/NAME.py`, whose folder Python puts first on sys.path."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
