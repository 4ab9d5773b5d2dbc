"""`python -m twistc ...`, which is how torchrun starts it: `torchrun --nproc-per-node N -m twistc compile ...`."""
import sys

from twistc.cli import entry

sys.exit(entry())
