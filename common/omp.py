"""Imported first by the entry points, before torch: idle OpenMP threads yield the CPU instead of spinning.

On shared or small CPUs, spinning threads slowed training steps several-fold. OpenMP reads the policy when
torch loads, so this must run before ``import torch``; a value already in the environment wins."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
