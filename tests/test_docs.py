"""The README's config reference is generated from ovr_train/config.py and must stay current and complete."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

import config_reference  # tools/ is on pytest's pythonpath (pyproject.toml)


def test_readme_config_reference_is_current():
    # PYTHONPATH: this checkout's ovr_train, not whichever one is pip-installed
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "config_reference.py"), "--check", str(ROOT / "README.md")],
                         capture_output=True, text=True, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_config_field_is_documented():
    assert config_reference.undocumented() == []
    assert len(config_reference.sections()) >= 8
