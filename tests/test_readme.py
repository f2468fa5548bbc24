"""The README's Quickstart is what CI runs: command (2) in the README and in .ci/run are the same line."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def quickstart_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", quickstart)


def test_ci_runs_exactly_the_readme_test_command():
    install_and_run, install_and_test = quickstart_commands()
    ci_lines = [line for line in (REPO / ".ci/run").read_text().splitlines() if line and not line.startswith("#")]
    assert install_and_test in ci_lines
    assert "pytest" in install_and_test
    assert "echo-lvdm pipeline --config configs/pipeline/quickstart.yaml" in install_and_run
