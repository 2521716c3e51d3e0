"""`lora-ds`: one subcommand per module of this package.

Each module has a docstring (its help line first), `add_arguments(parser)` and `run(args) -> int`,
and imports heavy libraries inside `run` so that `lora-ds --help` stays fast. Flags are spelled as the
trainer spells them, with underscores (`--max_len`); `lora_ds.config.flag_spellings` adds the hyphenated alias.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lora_ds.errors import UserError

SUBCOMMANDS = {
    "prep": "prep",
    "export-adapter": "export_adapter",
    "merge": "merge",
    "eval": "eval",
    "score": "score",
    "generate": "generate",
    "analyze": "analyze",
    "plot": "plot",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-ds", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(f"lora_ds.cli.{module_name}")
        command = sub.add_parser(name, help=module.__doc__.strip().splitlines()[0], description=module.__doc__)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UserError as e:
        print(f"lora-ds {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
