"""The `bench` command line. Flags for what users type most, Hydra overrides (key=value) for the rest.

Building the parser imports nothing heavy (no torch, pandas or Hydra), so `bench --help`, `bench VERB --help` and
`bench list` answer at once; each verb imports what it uses when it runs (scripts/cli_startup.py measures it).
"""
from __future__ import annotations

import argparse
import errno
import sys

from bench.cli import commands
from bench.cli.parser import build_parser
from bench.core.errors import TrainingDiverged, UserError

VERBS = {"run": commands.verb_run, "eval": commands.verb_eval, "sweep": commands.verb_sweep,
         "suite": commands.verb_suite, "table": commands.verb_table, "plot": commands.verb_plot,
         "report": commands.verb_report,
         "data": commands.verb_data, "mask": commands.verb_mask, "profile": commands.verb_profile,
         "export": commands.verb_export, "list": commands.verb_list}


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Options and key=value overrides in any order: argparse takes the overrides up to the first option that
    follows them, and leaves the rest over."""
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    unknown = [a for a in extra if a not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        what = " ".join(unknown or overrides)
        hint = f"`bench {args.verb} --help` lists its options" if args.verb else "`bench --help` lists the verbs"
        parser.exit(2, f"bench: error: unrecognized argument(s): {what} ({hint})\n")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    if args.verb is None:
        parser.print_help()
        return 2
    try:
        VERBS[args.verb](args)
    except UserError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"bench: training stopped: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except OSError as exc:  # outside the atomic writes (a log, a library's own file): still one line
        where = f" {exc.filename}" if exc.filename else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
            print(f"bench: error: cannot write{where} ({exc.strerror}); what was finished is kept: free space or "
                  f"choose a writable folder and re-run to continue", file=sys.stderr)
        elif exc.errno in (errno.EACCES, errno.EPERM):
            print(f"bench: error:{where or ' a file'}: {exc.strerror}", file=sys.stderr)
        else:
            raise
        return 2
    return 0

