"""The README's two set-up commands are what CI runs and what a new user types."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set-up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_readme_has_exactly_two_setup_commands_that_pin_cpu_torch():
    commands = _commands()
    assert len(commands) == 2
    for cmd in commands:
        assert "\n" not in cmd
        assert "python3 -m venv .venv" in cmd
        assert re.search(r"pip install [^&]*torch==2\.13\.0 [^&]*-e '\.\[", cmd)


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _commands()[1] in ci.splitlines()
