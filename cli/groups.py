"""The click groups every command hangs on, and the error policy they share.

Exit codes: 0 success, 2 usage errors (click's own), 1 data errors, with a one-line
message naming the file and the problem. ``triageseg --debug ...`` (or
``TRIAGESEG_DEBUG=1``) shows the full traceback instead.
"""

from __future__ import annotations

import os
import shlex
import sys

import click

from triageseg._version import __version__
from triageseg.datasets.errors import DataError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _debug_enabled() -> bool:
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx is not None else None
    flag = bool(root and root.obj and root.obj.get("debug"))
    return flag or os.environ.get("TRIAGESEG_DEBUG", "") not in ("", "0")


def _interrupt_message(ctx: click.Context) -> str:
    """What to tell a user who pressed Ctrl-C (or sent SIGTERM): the exact command that resumes, when one does.

    Commands with a ``--resume`` flag resume with it; ``segment`` resumes by running it again.
    """
    argv = ctx.meta.get("triageseg.argv")
    name = ctx.invoked_subcommand
    command = ctx.command.get_command(ctx, name) if isinstance(ctx.command, click.Group) and name else None
    if argv is None or command is None:
        return "interrupted: outputs written so far are complete"
    line = shlex.join(["triageseg", *argv])
    if any(param.name == "resume" for param in command.params):
        return "interrupted: to resume, run: " + (line if "--resume" in argv else line + " --resume")
    if getattr(command, "resumes_by_rerun", False):
        return "interrupted: outputs written so far are complete; to resume, rerun: " + line
    return "interrupted: outputs written so far are complete"


class ErrorHandlingGroup(click.Group):
    """A click group that turns data errors into one-line messages and exit code 1."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # the outermost group sees the whole command line: kept for the interrupt message
        ctx.meta.setdefault("triageseg.argv", list(args))
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            click.echo(_interrupt_message(ctx), err=True)
            sys.exit(130)
        except (DataError, FileNotFoundError, IsADirectoryError, PermissionError, OSError, ValueError) as err:
            if _debug_enabled():
                raise
            click.echo(f"error: {err}", err=True)
            sys.exit(1)


@click.group(cls=ErrorHandlingGroup, context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="triageseg")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """triageseg: nuclei instance segmentation routed by imaging modality.

    A ViT triages each image by modality and routes it to a modality-tuned Unet;
    a shared watershed turns its class probabilities into instance labels.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


@cli.group(cls=ErrorHandlingGroup, context_settings=CONTEXT)
def data() -> None:
    """Make, import and inspect datasets (synthetic generator, DSB 2018, BBBC039)."""


@cli.group(cls=ErrorHandlingGroup, context_settings=CONTEXT)
def train() -> None:
    """Train the router, the specialists, the generalist, or all of them into a bundle."""


def diameter_option(ctx, param, value: float | None) -> float | None:
    """A nucleus diameter option checked before anything loads: a finite number of pixels in a sane range."""
    from triageseg.router.size import check_diameter

    if value is None:
        return None
    try:
        return check_diameter(value)
    except ValueError as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from None
