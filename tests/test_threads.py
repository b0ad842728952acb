"""How idle OpenMP threads wait: the short-spin default and who may override it."""

from __future__ import annotations

import subprocess
import sys

from triageseg.segmenters.threads import (
    HUGEPAGE_ENV,
    SPIN_COUNT,
    runtime_may_spin,
    set_memory_advice,
    set_thread_waiting,
)


def test_short_spin_is_the_default():
    env: dict[str, str] = {}
    set_thread_waiting(env)
    assert env == {"GOMP_SPINCOUNT": SPIN_COUNT}
    assert not runtime_may_spin(env)  # ONNX Runtime / OpenVINO do not spin either


def test_the_users_wait_policy_wins():
    for given in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "300000"}):
        env = dict(given)
        set_thread_waiting(env)
        assert env == given
    assert runtime_may_spin({"OMP_WAIT_POLICY": "ACTIVE"})
    assert not runtime_may_spin({"OMP_WAIT_POLICY": "passive"})
    assert runtime_may_spin({"GOMP_SPINCOUNT": "300000"})
    assert runtime_may_spin({})  # a library user who set nothing keeps the runtimes' own default


def _cli_help(before: str, after: str) -> str:
    """Run ``triageseg --help`` through the console script's ``main()`` in a fresh Python, with ``before`` run
    ahead of it and ``after`` printing what the test checks; the last line printed."""
    code = (f"{before}\n"
            "sys.argv = ['triageseg', '--help']\n"
            "try:\n    m.main()\nexcept SystemExit:\n    pass\n"
            f"{after}")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_the_cli_sets_it_before_torch_is_imported():
    before = ("import os, sys; os.environ.pop('GOMP_SPINCOUNT', None); os.environ.pop('OMP_WAIT_POLICY', None)\n"
              "import triageseg.cli.main as m\n"
              "assert 'torch' not in sys.modules, 'the CLI imported torch before setting the wait policy'")
    assert _cli_help(before, "print(os.environ.get('GOMP_SPINCOUNT'))") == SPIN_COUNT


def test_numpy_huge_page_advice_is_off_unless_the_user_chose():
    env: dict[str, str] = {}
    set_memory_advice(env)
    assert env == {HUGEPAGE_ENV: "0"}
    for given in ("1", "0"):
        env = {HUGEPAGE_ENV: given}
        set_memory_advice(env)
        assert env == {HUGEPAGE_ENV: given}


def test_the_cli_turns_numpys_huge_page_advice_off_in_its_own_process():
    """NumPy is imported before main() runs (the command modules import it): its switch is turned off there, and
    the variable is left for child processes; a user's own setting is kept."""
    spy = ("import numpy as np, triageseg.cli.main as m\n"
           "core = getattr(np, '_core', None) or np.core\n"
           "calls = []; core.multiarray._set_madvise_hugepage = lambda on: calls.append(on)")
    report = "print(os.environ.get('NUMPY_MADVISE_HUGEPAGE'), calls)"
    unset = "import os, sys; os.environ.pop('NUMPY_MADVISE_HUGEPAGE', None)\n" + spy
    assert _cli_help(unset, report) == "0 [False]"
    chosen = "import os, sys; os.environ['NUMPY_MADVISE_HUGEPAGE'] = '1'\n" + spy
    assert _cli_help(chosen, report) == "1 []"


def test_a_thread_count_set_before_torch_reaches_the_runtimes_then_torch():
    """set_network_threads without torch loaded: the exported runtimes read it, torch takes it when a device
    is first resolved (before any eager network runs); the CPU device is named without importing torch."""
    code = (
        "import sys\n"
        "from triageseg.segmenters import threads\n"
        "from triageseg.devices import device_name\n"
        "assert threads.set_network_threads(1) == 1 and threads.current_threads() == 1\n"
        "assert device_name('cpu') == 'cpu' and device_name(' CPU ') == 'cpu'\n"
        "assert 'torch' not in sys.modules\n"
        "import torch\n"
        "n = torch.get_num_threads()\n"
        "from triageseg.devices import resolve_device\n"
        "assert str(resolve_device('cpu')) == 'cpu'\n"
        "print(n, torch.get_num_threads(), threads.current_threads())\n"
    )
    env_code = "import os; os.environ['OMP_NUM_THREADS'] = '2'\n" + code  # torch's own default: 2 threads
    out = subprocess.run([sys.executable, "-c", env_code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "1", "1"]


def test_device_names_match_the_torch_devices():
    import pytest

    from triageseg.devices import device_name, resolve_device

    for spec in ("cpu", "auto", None):
        assert device_name(spec) == str(resolve_device(spec))
    with pytest.raises(ValueError, match="unknown device"):
        device_name("tpu")
