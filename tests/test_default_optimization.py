"""The suite compiles at XLA's backend optimisation level 0 (conftest.py).  The tests that a miscompilation
would break — a step's time alone and inside a large vmapped batch (XLA:CPU once got that wrong), the stored
reference predictions of the packaged example and of the loaded steps — pass again here, compiled at the
default level as users run them."""
import os
import subprocess
import sys

from conftest import REPO, XLA_O0

SENSITIVE = ("tests/test_step_batching.py", "tests/test_predict_reference.py::test_predictions_match_reference[example]",
             "tests/test_predict_reference.py::test_predictions_match_reference[loaded_steps]")


def test_compiler_sensitive_tests_pass_at_the_default_level(tmp_path):
    flags = os.environ.get("XLA_FLAGS", "").replace(XLA_O0, "").strip()
    env = {**os.environ, "COSTMODEL_TESTS_XLA_DEFAULT": "1", "XLA_FLAGS": flags,
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache")}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *SENSITIVE],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout.splitlines()[-1], r.stdout[-500:]
