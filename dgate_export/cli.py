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


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", default=None, type=click.Path(), help="Bundle directory [default: engines/<model stem>].")
@click.option("--backend", default="onnxruntime", show_default=True, help="onnxruntime or tensorrt.")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Float type of the graphs (fp16: exported from the half model).")
@click.option("--max-batch", default=256, show_default=True, type=click.IntRange(min=1),
              help="Largest batch the bundle accepts (every batch dimension is dynamic in 1..max).")
@click.option("--opset", default=None, type=int, help="ONNX opset [default: the exporter's].")
@click.option("--exporter", type=click.Choice(["dynamo", "torchscript"]), default="dynamo", show_default=True,
              help="torch.onnx exporter: dynamo (current), torchscript (deprecated; faster, a fallback).")
@click.option("--force", is_flag=True, help="Replace an existing bundle (only after the new one is built).")
def build(model, output, backend, precision, max_batch, opset, exporter, force):
    """Build a bundle from a gated MODEL (model.pt): per-segment ONNX graphs, engines, manifest.json.

    Every graph passes the ONNX checker and a parity check against the torch model (same exit
    decisions, logits within tolerance) before the bundle is renamed into place; a failure at any
    step leaves nothing behind.
    """
    from .build import build_bundle

    build_bundle(model, output, backend=backend, precision=precision, max_batch=max_batch, opset=opset,
                 force=force, exporter=exporter, progress=click.echo)


@main.command("inspect")
@click.argument("path", type=click.Path())
def inspect_cmd(path):
    """Describe a bundle directory (and verify its hashes) or a gated checkpoint file."""
    from pathlib import Path

    target = Path(path)
    if target.is_dir():
        from .manifest import describe_bundle

        describe_bundle(target)
    elif target.is_file():
        from .checkpoint import describe

        describe(target)
    else:
        raise UserError(f"{path}: no such file or directory.",
                        "Give a bundle directory (engines/NAME) or a gated checkpoint (model.pt).")
