"""The `hkd` parser, built per command: every parser_X is assembled and runs its own cmd_X, every command answers
--help, and the options several commands share read the same in each. (Bad arguments: test_cli_errors.py.)"""

import argparse

import pytest

from hkd import cli


def commands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_command_runs_its_own_handler():
    parsers = {n for n in vars(cli) if n.startswith("parser_")}
    handlers = {n for n in vars(cli) if n.startswith("cmd_")}
    assert {f.__name__ for f in cli.COMMANDS} == parsers  # none defined and left out of build_parser
    assert len(cli.COMMANDS) == len(parsers)
    names = {name: "cmd_" + name.replace("-", "_") for name in commands()}
    assert set(names.values()) == handlers
    for name, parser in commands().items():
        assert parser.get_default("func").__name__ == names[name], name


@pytest.mark.parametrize("name", [None, *commands()])
def test_every_command_answers_help(name, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--help"] if name is None else [name, "--help"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: hkd {name or ''}".rstrip())


def test_shared_options_read_the_same_in_every_command():
    """--device, --model, --teacher, --overwrite: one name, choices, default and type wherever they appear."""
    for dest in ("device", "model", "teacher", "overwrite"):
        shapes = {
            (tuple(a.option_strings), tuple(a.choices or ()), a.default, a.type)
            for parser in commands().values()
            for a in parser._actions
            if a.dest == dest
        }
        assert len(shapes) == 1, (dest, shapes)
