"""Install the carried wheels that this Python lacks (or has too old) into a target folder for PYTHONPATH.

    python benchmarks/install_wheels.py .whl /tmp/ovr-site

The GPU image already holds torch, triton, transformers and (as last seen) pytest & co.: a carried copy of a
package it has would shadow it and may not fit the plugins built beside it, so a wheel is installed only when its
distribution is missing or older than MIN_VERSIONS asks. Prints what it kept and what it installed.
"""

import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.version import Version

MIN_VERSIONS = {"pytest": "8.1", "pytest-benchmark": "5.0"}  # pytest-benchmark 5 needs pytest >= 8.1


def _dist_name(wheel: Path) -> str:
    return wheel.name.split("-", 1)[0].replace("_", "-").lower()


def needed(wheels: list[Path]) -> list[Path]:
    """The wheels whose distribution is not installed, or installed below its MIN_VERSIONS entry."""
    out = []
    for wheel in wheels:
        name = _dist_name(wheel)
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            print(f"install {wheel.name}: {name} missing")
            out.append(wheel)
            continue
        if name in MIN_VERSIONS and Version(have) < Version(MIN_VERSIONS[name]):
            print(f"install {wheel.name}: {name} {have} < {MIN_VERSIONS[name]}")
            out.append(wheel)
        else:
            print(f"keep {name} {have}")
    return out


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        raise SystemExit("usage: install_wheels.py WHEEL_DIR TARGET_DIR")
    wheels = sorted(Path(args[0]).glob("*.whl"))
    todo = needed(wheels)
    if not todo:
        print("nothing to install")
        return 0
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", args[1], *map(str, todo)]
    return subprocess.run(cmd, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
