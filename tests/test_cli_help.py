"""`cm3leon --help`'s description names every command the parser has."""
import argparse
import re

from cm3leon_jax import cli


def test_description_names_every_command():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    named = set(re.findall(r"[a-z][a-z-]*", cli.DESCRIPTION))
    assert set(commands) - named == set()
    assert "later commands" not in cli.DESCRIPTION
