"""The click plumbing of the command line (``main.py`` defines the commands with it): the context settings, the
subcommand class of the standalone commands, the options a user gave, the '--help' text of method-dependent
defaults, and ``invoke``, which runs the command group and turns what it raises into one line and an exit code.
Light to import (click and the torch-free ``methods``, ``errors``, ``runstate``)."""
from __future__ import annotations

import signal
import sys

import click
from click.core import ParameterSource

import runstate
from errors import ONE_LINE_ERRORS
from methods import CONFIGS, CRAS_SINGLE_BATCH_SIZE, NOT_FOR, RESIZE_DEFAULTS

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 110}


def both(option: str) -> str:
    """'--help' default text: PBAS's and CRAS's default of a method-dependent option."""
    values = {}
    for name, config in CONFIGS.items():
        if option in NOT_FOR[name]:
            values[name] = "-"
        elif option == "resize":
            values[name] = RESIZE_DEFAULTS[name]
        elif option == "setting":
            values[name] = "multi"
        else:
            values[name] = getattr(config(), option)
    if option == "batch_size":
        values["cras"] = f"{values['cras']} multi, {CRAS_SINGLE_BATCH_SIZE} single"
    return f"pbas: {values['pbas']}; cras: {values['cras']}"


def given_options(ctx: click.Context, options: dict) -> dict:
    """The options the user gave (not their defaults) -> their values."""
    return {k: v for k, v in options.items() if ctx.get_parameter_source(k) in (ParameterSource.COMMANDLINE,
                                                                                  ParameterSource.ENVIRONMENT)}


def option_given(name: str) -> bool:
    """Whether the global option ``name`` was given on the command line (not its default)."""
    return click.get_current_context().find_root().get_parameter_source(name) == ParameterSource.COMMANDLINE


class InterspersedCommand(click.Command):
    """A chained subcommand whose options may follow its arguments (``predict IMAGES... --output DIR``).

    Chained groups parse subcommands with interspersed options off; a tool subcommand takes every
    remaining argument, since it cannot be combined with other subcommands anyway.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.allow_interspersed_args = True
        return super().parse_args(ctx, args)


def invoke(group: click.Group, argv: list[str] | None) -> int:
    """Run ``group`` on ``argv``: bad input is one 'error:' line on stderr and exit code 2; a command's own exit
    code; 128 + signal when a stop signal ended the run (SIGTERM 143, SIGINT 130)."""
    try:
        group.main(args=argv, prog_name="main.py", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        print(f"error: {exc.format_message()}", file=sys.stderr)
        return 2
    except ONE_LINE_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except runstate.Interrupted as exc:
        name = signal.Signals(exc.signum).name
        job = getattr(exc, "job", None)
        if exc.saved and job:
            where = f"the training state of {job} is saved ({exc.saved}); run the same command again to resume"
        elif exc.saved:
            where = f"training states saved ({exc.saved}); run the same command again to resume"
        else:
            where = "finished jobs are kept; run the same command again to continue"
        print(f"interrupted by {name}: {where}", file=sys.stderr)
        return 128 + exc.signum
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("interrupted: finished jobs and the best checkpoint so far are kept", file=sys.stderr)
        return 130
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
