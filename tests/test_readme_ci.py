"""CI must run exactly what the README tells a new user to run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    install_and_run, install_and_test = blocks[0].strip(), blocks[1].strip()
    assert "compress --target" in install_and_run and install_and_test.endswith("pytest")
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert install_and_run in ci_lines and install_and_test in ci_lines
    commands = [line for line in ci_lines if line and not line.startswith(("#", "set ", "cd ", "export "))]
    assert commands == [install_and_run, install_and_test], "no hidden steps in .ci/run"
