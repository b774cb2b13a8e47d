"""The README's config reference is generated from ovr_train/config.py and must stay current and complete."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import config_reference


def test_readme_config_reference_is_current():
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "config_reference.py"), "--check", str(ROOT / "README.md")],
                         capture_output=True, text=True, check=False,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))  # this tree's config.py, not an installed copy
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_config_field_is_documented():
    assert config_reference.undocumented() == []
    assert len(config_reference.sections()) >= 8
