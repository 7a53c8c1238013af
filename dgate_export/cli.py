"""The `dgate-export` command line.

Heavy modules (torch, onnx, tensorrt) are imported inside the commands so that `--help` is fast and
works without them. A `UserError` is printed as one paragraph and exits with status 2; `--debug` shows
its traceback. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import sys
import textwrap

import click

from .errors import UserError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as err:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            message = textwrap.fill(str(err), width=100)
            click.echo(f"error: {message}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for user errors too.")
@click.option(
    "--import",
    "imports",
    multiple=True,
    metavar="MODULE",
    help="Import MODULE first (a module you trust that registers custom architectures). Repeatable.",
)
@click.pass_context
def main(ctx: click.Context, debug: bool, imports: tuple[str, ...]) -> None:
    """Compile networks with decision gates (early exits) into fast deployable bundles.

    \b
    Typical flow:
      dgate-export gate --arch resnet20 --data fashion-mnist -o model.pt
      dgate-export build model.pt                 # -> engines/model/
      dgate-export bench --engine engines/model --data fashion-mnist
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    for name in imports:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise UserError(
                f"--import {name}: the module could not be imported ({err}).",
                "Check the module name and that its folder is on PYTHONPATH.",
            ) from err
