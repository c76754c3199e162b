"""The README is the user's manual: it opens with the two set-up commands and documents every flag."""

from __future__ import annotations

import re

import click

from launcher.cli import cli
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def test_the_readme_opens_with_the_two_setup_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    assert [line.split("#")[0].strip() for line in first_block.strip().splitlines()] == ["make demo", "make test"]


def test_every_command_and_flag_is_in_the_command_line_reference():
    reference = README[README.index("## Command line"):]
    missing = []
    for name, command in cli.commands.items():
        if f"dialogtrain {name}" not in reference:
            missing.append(f"dialogtrain {name}")
        for param in command.params:
            if isinstance(param, click.Option):
                missing += [f"{name} {opt}" for opt in param.opts if opt.startswith("--") and opt not in reference]
    assert not missing, missing
