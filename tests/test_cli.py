import argparse

from moexport.cli import SUBCOMMANDS, build_parser


def test_subcommand_help_is_the_docstring_without_its_source_indentation():
    (subparsers,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for name, (fn, _) in SUBCOMMANDS.items():
        description = subparsers.choices[name].description
        assert description.splitlines()[0] == fn.__doc__.strip().splitlines()[0], name
        assert not any(line.startswith(" ") for line in description.splitlines()), name
