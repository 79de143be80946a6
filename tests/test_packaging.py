"""pyproject.toml declares the dependencies that requirements.txt pins, at the same versions."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==(\S+)$")


def pins(lines) -> dict[str, str]:
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("zotune["):
            continue
        m = PIN.match(line)
        assert m, f"not an exact pin: {line!r}"
        out[m.group(1).lower().replace("_", "-") + (m.group(2) or "")] = m.group(3)
    return out


def test_pyproject_pins_what_requirements_pin():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = pins(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        declared.update(pins(extra))
    required = pins((ROOT / "requirements.txt").read_text().splitlines())
    assert declared == required
    assert pins(project["dependencies"])["torch"] == "2.13.0"
    constraints = pins((ROOT / "constraints.txt").read_text().splitlines())
    assert all(required[name] == version for name, version in constraints.items())
