"""A real MONAI Label 0.8.5 server serves the BTCV bundle and segments the shared CT slab.

Runs ``ci/monailabel_check.py --skip-build`` (tiny model trained through the bundle, ``monaibundle``
app, ``/info/`` labels, ``POST /infer``). MONAI Label lives in its own environment (it pins
``numpy<2``); building it takes minutes and several GB, so this test only uses an environment that
``make test-monailabel`` (or ``python ci/monailabel_check.py``) completed, and is skipped otherwise.
``$MONAILABEL_VENV`` points it at an environment elsewhere than ``<repo>/.venv-monailabel``.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from helpers import REPO

from bundles.sample_data import SMALL_SIZES

CHECK = REPO / "ci" / "monailabel_check.py"


def _load_check():
    spec = importlib.util.spec_from_file_location("monailabel_check", CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = _load_check()


def test_the_check_trains_the_tiny_model_at_the_tests_sizes():
    """The check keeps its own copy of the sizes (it runs on the standard library alone, from anywhere)."""
    assert check.TINY_SIZES == SMALL_SIZES


@pytest.mark.timeout(1500)
def test_monailabel_serves_btcv_bundle():
    venv = check.default_venv()
    if not check.venv_complete(venv):
        pytest.skip(f"MONAI Label environment absent: run make test-monailabel ({venv})")
    cmd = [sys.executable, str(CHECK), "--skip-build", "--venv", str(venv), "--project-python", sys.executable]
    proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", timeout=1400, cwd=REPO)
    assert (
        proc.returncode == 0
    ), f"{' '.join(cmd)}\nexit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    assert "MONAI Label check passed" in proc.stdout
