"""The machine's load, printed by the CPU benchmarks: other jobs on a 2-core machine skew
their figures (bench_cubs' per-round ratios spread from 1.02x to 3.50x under a load average
of about 5: the 2-core development VM, 2026-12-07)."""
from __future__ import annotations

import os


def load_note(when: str = "") -> str:
    """'load average 1.02 0.98 0.95' (1, 5, 15 minutes) and a warning when the last minute's
    is above half the CPUs."""
    load, cpus = os.getloadavg(), os.cpu_count() or 1
    return (f"{cpus} CPUs, load average{' ' + when if when else ''} {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
            + ("  (machine is loaded: figures are noisy)" if load[0] > 0.5 * cpus else ""))
