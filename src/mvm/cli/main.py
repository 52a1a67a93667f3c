"""The `mvm` command line: the Typer app assembled from one module per command group, and the
error edge. Each command parses, calls the services, and prints; nothing else."""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Iterable
from typing import Annotated

import click
import typer

from mvm import __version__
from mvm.cli import output
from mvm.cli.agent import agent_app
from mvm.cli.common import STATE
from mvm.cli.events import events
from mvm.cli.host import builder_app, config_app, doctor, net_app, setup
from mvm.cli.instance import instance_app
from mvm.cli.pool import pool_app
from mvm.cli.tenant import tenant_app
from mvm.errors import EXEC_NOT_STARTED, MvmError
from mvm.util.private import PRIVATE_UMASK

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Fleets of microVMs for many tenants, built from Nix flakes.")


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
          agent: Annotated[str | None, typer.Option(
              "--agent", envvar="MVM_AGENT", metavar="SOCKET",
              help="Go through the agent's API at this Unix socket (or http://HOST:PORT, token in"
              " MVM_AGENT_TOKEN).")] = None) -> None:
    STATE["debug"] = debug
    STATE["agent"] = agent


@app.command()
def version() -> None:
    """Print mvm's version."""
    print(__version__)


# (the order `mvm --help` lists them in: commands first, then groups)
app.command()(setup)
app.command()(doctor)
app.command()(events)
for _group, _name in ((tenant_app, "tenant"), (pool_app, "pool"), (config_app, "config"),
                      (builder_app, "builder"), (instance_app, "instance"), (net_app, "net"),
                      (agent_app, "agent")):
    app.add_typer(_group, name=_name)


#: What Rich's `markup.escape` puts before a `[tag]`: a backslash (and each backslash before it doubled).
_RICH_ESCAPED = re.compile(r"(\\*)\\(\[[a-z#/@][^[]*?])")


def _unescape(text: str) -> str:
    return _RICH_ESCAPED.sub(lambda m: m.group(1)[:len(m.group(1)) // 2] + m.group(2), text)


class _HelpFormatter(click.HelpFormatter):
    """Click's plain help. Typer escapes the `[default: …]`, `[required]` and `[env var: …]` it
    adds to a parameter's help for Rich whenever Rich is installed, even when Rich does not
    render the help (`rich_markup_mode=None`): undone here, or `--help` shows `\\[required]`."""

    def write_dl(self, rows: Iterable[tuple[str, str]], col_max: int = 30, col_spacing: int = 2) -> None:
        super().write_dl([(term, _unescape(text)) for term, text in rows], col_max, col_spacing)


class _Context(click.Context):
    formatter_class = _HelpFormatter


def command() -> click.Command:
    """The click command tree of `app`, every command's help printed by `_HelpFormatter`."""
    root = typer.main.get_command(app)
    todo = [root]
    while todo:
        cmd = todo.pop()
        cmd.context_class = _Context
        if isinstance(cmd, click.Group):
            todo += cmd.commands.values()
    return root


def main(argv: list[str] | None = None) -> int:
    """Entry point: every error becomes one clear line and a non-zero exit code."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    os.umask(PRIVATE_UMASK)  # what mvm and the programs it starts create, only root reads
    try:
        rc = command().main(args=args, prog_name="mvm", standalone_mode=False)
        return rc if isinstance(rc, int) else 0
    except MvmError as e:
        if debug:
            traceback.print_exc()
        line = e.line()
        line = line[len("error: "):] if line.startswith("error: ") else line  # Nix's own prefix
        output.error(line)
        return e.exit_code
    except click.exceptions.NoArgsIsHelpError as e:
        e.show()
        return 0
    except click.UsageError as e:
        cmd = e.ctx.command_path if e.ctx else "mvm"
        output.error(f"{e.format_message()} (see `{cmd} --help`)")
        return EXEC_NOT_STARTED if cmd == "mvm instance exec" else 2
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        output.note("aborted")
        return 130
    except click.ClickException as e:
        output.error(e.format_message())
        return e.exit_code
    except KeyboardInterrupt:
        output.note("interrupted")
        return 130
    except Exception as e:  # a bug: still one line, the traceback with --debug
        if debug:
            traceback.print_exc()
        output.error(f"internal error: {e.__class__.__name__}: {e} (rerun with --debug for a traceback)")
        return 70


if __name__ == "__main__":
    sys.exit(main())
