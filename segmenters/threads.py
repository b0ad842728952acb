"""How idle OpenMP threads wait: a short spin, then sleep (set before torch is imported).

torch's OpenMP pool (libgomp) spins by default for about 300,000 iterations before a
waiting thread sleeps. When the cores are shared with other work, those spins steal the
cores the other threads need; with ``OMP_WAIT_POLICY=PASSIVE`` nothing spins, but every
one of an EfficientNet's hundreds of small operators then pays a wake-up. Measured on a
2-core CPU (efficientnet-b3 Unet training step, batch 4 of 128², 2 threads, s/step):

======================  =====  ==========================
policy                  quiet  two such processes at once
======================  =====  ==========================
default (spin 300,000)  0.36   1.9-2.2
``PASSIVE``             0.62   0.68-0.76
``GOMP_SPINCOUNT=1000`` 0.37   0.90-0.92
======================  =====  ==========================

So the default here is a spin of 1,000 iterations: as fast as spinning on a quiet
machine, and within 1.3x of ``PASSIVE`` on a shared one. The user's own
``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` wins.
"""

from __future__ import annotations

import os

SPIN_COUNT = "1000"


def set_thread_waiting(environ: dict | None = None) -> None:
    """Set ``GOMP_SPINCOUNT`` to :data:`SPIN_COUNT` unless the user chose a wait policy.

    Only takes effect before the OpenMP runtime starts (before torch is imported).
    """
    env = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        env["GOMP_SPINCOUNT"] = SPIN_COUNT


def runtime_may_spin(environ: dict | None = None) -> bool:
    """Whether other runtimes (ONNX Runtime, OpenVINO) may spin their idle threads.

    Not when OpenMP was asked to wait passively or to spin only briefly (the default above):
    a spinning pool on shared cores is what both settings avoid.
    """
    env = os.environ if environ is None else environ
    if env.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE":
        return False
    spin = env.get("GOMP_SPINCOUNT", "").strip()
    if spin:
        try:
            return float(spin) >= 100_000
        except ValueError:
            return True
    return True
