"""The router's modules import in one direction: policy (torch-free) never needs model, model never re-exports policy."""

import subprocess
import sys


def test_policy_imports_without_the_router_model():
    code = ("import sys; import triageseg.router.policy as p; "
            "assert 'triageseg.router.model' not in sys.modules, 'policy imported model'; "
            "assert 'torch' not in sys.modules, 'policy imported torch'; print(p.decide.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "decide"


def test_model_does_not_reexport_policy_names():
    import triageseg.router.model as model

    for name in ("decide", "UnknownModality", "UNKNOWN_POLICIES", "UNKNOWN_DECISION", "SKIPPED"):
        assert not hasattr(model, name), f"router.model still re-exports {name}; import it from router.policy"
