"""``quantaware presets``: show the built-in presets as loadable JSON."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "presets", help="show the built-in quantization presets as JSON",
        description="Print the named presets (or one of them) as the JSON that "
        "QuantConfig.from_dict reads.",
    )
    parser.add_argument("name", nargs="?", help="a preset name, e.g. INT8")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from quantaware import presets
    from quantaware.cli import UsageError

    names = [args.name] if args.name else sorted(presets.PRESETS)
    try:
        payload = {name.upper(): presets.get(name).to_dict() for name in names}
    except KeyError as exc:
        raise UsageError(exc.args[0]) from exc
    print(json.dumps(payload, indent=2))
    return 0
