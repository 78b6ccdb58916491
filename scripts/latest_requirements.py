"""Print requirement lines for the drift check: pyproject's dependencies (and the dev extra) with
each upper bound lifted to the end of its compatibility range, so pip picks the newest release a
user could get if we widened the tested bound: the same major version (the same minor for 0.x,
where minor releases break). torch and triton stay at requirements.lock: the README pins torch,
and PyPI's torch pins triton on Linux, so neither moves without the other.

    python scripts/latest_requirements.py > latest.txt
"""
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs before the project is installed; eval.stack needs only the stdlib
from eval.stack import read_lock  # noqa: E402
HELD = ("torch", "triton")


def lifted(requirement: str, pins: dict[str, str]) -> str:
    m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(.*)", requirement.replace(" ", ""))
    name, spec = m.group(1), m.group(2)
    key = name.lower().replace("_", "-")
    if key in HELD:
        return f"{name}=={pins[key]}"
    lower = re.search(r">=([0-9][0-9.]*)", spec)
    if lower is None:
        return name
    # compatibility range from the newest tested (locked) release, not from the old lower bound
    tested = [int(p) for p in re.findall(r"[0-9]+", pins.get(key, lower.group(1)))[:2]] + [0]
    major, minor = tested[0], tested[1]
    ceiling = f"0.{minor + 1}" if major == 0 else f"{major + 1}"
    return f"{name}>={lower.group(1)},<{ceiling}"


def main() -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = read_lock(ROOT / "requirements.lock")
    for requirement in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
        print(lifted(requirement, pins))
    return 0


if __name__ == "__main__":
    sys.exit(main())
