"""Shared command-line plumbing: the error contract, common options, progress rendering.

Error contract for every command: an :class:`RclipError` becomes one red line (plus a dim hint
line), exit 2 for bad input, 1 for runtime failures; no traceback unless ``--debug``. Any
other exception is reported the same way as an internal error (exit 1).
"""

from __future__ import annotations

import functools
import os
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import click
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from rclip_core.errors import InputError, RclipError

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)


def _debug_enabled(kwargs: dict) -> bool:
    return bool(kwargs.get("debug")) or os.environ.get("RCLIP_DEBUG", "") not in ("", "0")


def fail(message: str, hint: str | None = None, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True, markup=True, highlight=False)
    if hint:
        err_console.print(f"[dim]hint: {hint}[/]", soft_wrap=True)
    sys.exit(code)


def handle_errors(fn: Callable) -> Callable:
    """Wrap a click callback with the error contract. Adds nothing to the signature."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = _debug_enabled(kwargs)
        try:
            return fn(*args, **kwargs)
        except RclipError as e:
            if debug:
                raise
            fail(_escape(str(e)),
                 _escape(e.hint) if e.hint else None, e.exit_code)
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            sys.exit(130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except MemoryError:
            if debug:
                raise
            fail("out of memory", "use a smaller --batch-size or fewer boxes", 1)
        except Exception as e:  # noqa: BLE001 - the one place that turns surprises into one line
            if debug:
                raise
            msg = " ".join(f"{type(e).__name__}: {e}".split())
            fail(_escape(f"internal error: {msg}"), "rerun with --debug for the traceback and report it", 1)

    return wrapper


def _escape(s: str) -> str:
    from rich.markup import escape

    return escape(s)


def debug_option(fn: Callable) -> Callable:
    return click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")(fn)


def device_option(fn: Callable) -> Callable:
    return click.option("--device", default="auto", show_default=True,
                        help="cpu, cuda, cuda:N or auto (CUDA when available).")(fn)


class OneLineUsageError(click.UsageError):
    """A click usage error (bad option value, missing argument, a file where a folder is
    expected) shown as the error contract says: one red line and a hint, exit 2 - not click's
    usage block."""

    def show(self, file: Any = None) -> None:
        command = self.ctx.command_path if self.ctx is not None else "rclip"
        err_console.print(f"[bold red]error:[/] {_escape(' '.join(self.format_message().split()))}",
                          soft_wrap=True, markup=True, highlight=False)
        err_console.print(f"[dim]hint: {_escape(f'see {command} --help')}[/]", soft_wrap=True)


def _one_line_usage(call: Callable[[], Any]) -> Any:
    """Run click's parsing step ``call``; its usage errors become :class:`OneLineUsageError`."""
    try:
        return call()
    except OneLineUsageError:
        raise
    except click.UsageError as e:
        raise OneLineUsageError(e.format_message(), e.ctx) from None


class RclipCommand(click.Command):
    """click.Command whose usage errors follow the error contract (:class:`OneLineUsageError`)."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        return _one_line_usage(lambda: super(RclipCommand, self).make_context(info_name, args, parent=parent,
                                                                              **extra))


class RclipGroup(click.Group):
    """click.Group whose usage errors (an unknown subcommand, a bad option) follow the error
    contract like :class:`RclipCommand`'s."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        return _one_line_usage(lambda: super(RclipGroup, self).make_context(info_name, args, parent=parent,
                                                                            **extra))

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        return _one_line_usage(lambda: super(RclipGroup, self).resolve_command(ctx, args))


def rclip_command(name: str | None = None, **settings: Any) -> Callable:
    """``@rclip_command()`` = ``@click.command`` + ``--debug`` + the error contract."""

    def deco(fn: Callable) -> click.Command:
        wrapped = handle_errors(fn)
        wrapped = debug_option(wrapped)
        settings.setdefault("context_settings", {"help_option_names": ["-h", "--help"], "max_content_width": 100})
        settings.setdefault("cls", RclipCommand)
        return click.command(name, **settings)(wrapped)

    return deco


@contextmanager
def progress_bar(description: str, total: int | None, unit: str = "it", disable: bool | None = None
                 ) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n=1, **fields)``; renders a rich progress bar with rate and ETA on a TTY
    (and stays quiet when output is not a terminal, unless RCLIP_PROGRESS=1)."""
    if disable is None:
        disable = not (console.is_terminal or os.environ.get("RCLIP_PROGRESS") == "1")
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[extra]}")]
    with Progress(*columns, console=err_console, disable=disable, transient=False) as prog:
        task = prog.add_task(description, total=total, rate="", extra="")
        import time

        t0 = time.perf_counter()
        done = [0]

        def advance(n: int = 1, extra: str = "") -> None:
            done[0] += n
            dt = max(time.perf_counter() - t0, 1e-9)
            prog.update(task, advance=n, rate=f"{done[0] / dt:.2f} {unit}/s", extra=extra)

        yield advance


def parse_key_values(pairs: tuple[str, ...]) -> dict[str, str]:
    """``("a.b=1", "c=x")`` -> ``{"a.b": "1", "c": "x"}``; a pair without ``=`` is bad input."""
    out: dict[str, str] = {}
    for p in pairs:
        if "=" not in p:
            raise InputError(f"override {p!r} is not of the form key=value")
        k, v = p.split("=", 1)
        if not k:
            raise InputError(f"override {p!r} has an empty key")
        out[k.strip()] = v
    return out
