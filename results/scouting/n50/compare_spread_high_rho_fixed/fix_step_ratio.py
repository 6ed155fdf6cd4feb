"""Scouting wrapper (not part of fedlora): run the fedlora CLI with the online planner's step
ratio rho held at a given value from round 1 (STEP_RATIO_RANGE pinned to [x, x]), to see what
knowing rho up front would give. Usage: python fix_step_ratio.py 0.1 compare CONFIG ..."""
import sys

import fedlora.online as o

x = float(sys.argv.pop(1))
o.STEP_RATIO_RANGE = (x, x)
from fedlora.cli import app  # noqa: E402

app()
