"""The README's Quickstart is what CI runs: command (2) in the README and in .ci/run are the same line."""

import re

from tests.helpers.cli import REPO


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


def test_the_design_ships_with_the_code_and_nothing_points_outside_the_repository():
    readme = (REPO / "README.md").read_text()
    assert "[DESIGN.md](DESIGN.md)" in readme and (REPO / "DESIGN.md").is_file()
    design = (REPO / "DESIGN.md").read_text()
    for section in ("## Data flow", "## The shared batch contract", "## Metrics", "## Phantom", "## Layout",
                    "Imports run one way"):
        assert section in design
    files = [REPO / "README.md", REPO / "DESIGN.md", REPO / "pyproject.toml"]
    for folder in ("datamodules", "lightning_modules", "callbacks", "echo_lvdm", "configs", "tests", "benchmarks"):
        files += [path for path in (REPO / folder).rglob("*") if path.suffix in (".py", ".md", ".yaml")]
    beyond = ("../" + "shared", "shared " + "notes")  # spelled apart so this file does not match itself
    outside = [str(path.relative_to(REPO)) for path in files if any(word in path.read_text() for word in beyond)]
    assert not outside, outside
