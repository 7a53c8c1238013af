"""The `dgate-export` command line.

Heavy modules (torch, onnx, tensorrt) are imported inside the commands so that `--help` is fast and
works without them. A `UserError` is printed as one paragraph and exits with status 2; `--debug` shows
its traceback. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import math
import sys
import textwrap
from pathlib import Path

import click

from .contract import CONFIDENCES, DEFAULT_CONFIDENCE
from .data import DEFAULT_VAL_SIZE
from .errors import UserError

# Packages that come with an extra, not with `pip install dgate-export` (which runs and benchmarks bundles).
EXTRAS = {"torch": "compile", "torchvision": "compile", "onnx": "compile", "onnxscript": "compile",
          "tensorrt": "tensorrt", "cuda": "tensorrt", "matplotlib": "plot", "pyarrow": "parquet", "PIL": "images"}


def missing_extra(err: ModuleNotFoundError) -> UserError | None:
    """A UserError naming the extra to install when `err` is a package of an extra, else None."""
    package = (err.name or "").split(".")[0]
    extra = EXTRAS.get(package)
    if extra is None:
        return None
    return UserError(f"This command needs {package}, which is not installed here: it comes with the "
                     f"dgate-export[{extra}] extra, which the plain install leaves out.",
                     f"Install it: pip install 'dgate-export[{extra}]'.")


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            try:
                return super().invoke(ctx)
            except ModuleNotFoundError as missing:
                err = missing_extra(missing)
                if err is None:
                    raise
                raise err from missing
        except UserError as err:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            message = textwrap.fill(err.paragraph, width=100, break_on_hyphens=False, break_long_words=False)
            click.echo(f"error: {message}", err=True)
            if err.detail:
                click.echo(err.detail, err=True)  # verbatim: a log's lines keep their own layout
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


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise UserError(f"{what} must be comma-separated integers, got {text!r}.") from err


def _float_list(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise UserError(f"{what} must be comma-separated numbers, got {text!r}.") from err


@main.command()
@click.option("--engine", "bundle", required=True, type=click.Path(), help="Bundle directory (engines/NAME).")
@click.option("--data", default=None, help="Labelled data: fashion-mnist, npz:PATH, npy:DIR or folder:PATH (its test split is used; "
              "images prepared as the bundle records).")
@click.option("--data-dir", default=None, type=click.Path(), help="Folder of the Fashion-MNIST IDX files.")
@click.option("--repeat-channels", is_flag=True, help="Repeat 1-channel data to the model's channel count.")
@click.option("--random", "random_n", type=int, default=None, help="Time on N random inputs instead (no accuracy).")
@click.option("--limit", type=int, default=None, help="Use only the first N samples of the data.")
@click.option("--batch-sizes", default="1,32,256", show_default=True, help="Comma-separated batch sizes to time.")
@click.option("--warmup-ms", default=200.0, show_default=True, help="Warm-up before timing each batch size.")
@click.option("--min-iterations", default=10, show_default=True, help="Timed iterations per batch size, at least.")
@click.option("--min-seconds", default=3.0, show_default=True, help="Timed seconds per batch size, at least.")
@click.option("--timing-mb", default=256, show_default=True, type=click.IntRange(min=1),
              help="Model input held in memory for the timed batches: the data's first rows that fit (at least "
                   "two of the largest batches).")
@click.option("--thresholds", default=None, help="Override the bundle's thresholds: a,b,c (one per gate).")
@click.option("--backend", default=None, help="Run on another backend than the bundle's (e.g. onnxruntime).")
@click.option("--sweep", is_flag=True, help="Also sweep one threshold at every gate: accuracy, FLOPs, speed-up.")
@click.option("--exit-times", is_flag=True,
              help="Also time leaving at each exit: the ideal speed-up from measured times, not FLOPs, and the "
                   "runtime's efficiency against it.")
@click.option("--cuda-graphs", is_flag=True,
              help="Replay CUDA graphs per segment and batch bucket (TensorRT, or ONNX Runtime with --providers cuda).")
@click.option("--providers", default=None, metavar="LIST",
              help="ONNX Runtime: execution providers in priority order, e.g. cuda (needs onnxruntime-gpu) "
                   "[default: cpu].")
@click.option("--json", "json_path", default=None, type=click.Path(), help="Write the full figures as JSON.")
@click.option("--plot", "plot_path", default=None, type=click.Path(), help="Write accuracy-vs-cost and speed-up plots (PNG).")
def bench(bundle, data, data_dir, repeat_channels, random_n, limit, batch_sizes, warmup_ms, min_iterations,
          min_seconds, timing_mb, thresholds, backend, sweep, exit_times, cuda_graphs, providers, json_path, plot_path):
    """Measure a bundle against its un-gated baseline on the same backend.

    Reports accuracy (gated vs baseline, per exit), exit fractions, expected FLOPs and the ideal
    speed-up, and per batch size the latency (mean, median, p90, p95, p99, min, max), throughput,
    measured speed-up and efficiency (measured / ideal), timing gated and baseline interleaved.
    """
    import numpy as np

    from . import bench as bench_mod
    from . import render
    from .data import data_file
    from .manifest import load_manifest
    from .outputs import check_output

    for flag, path in (("--json", json_path), ("--plot", plot_path)):
        if path:  # before the measurement, which would be lost
            check_output(path, flag=flag, reads=(bundle, data_file(data)))
    if json_path and plot_path and Path(json_path).resolve() == Path(plot_path).resolve():
        raise UserError(f"--json and --plot name the same file, {json_path}.", "Give each its own path.")
    manifest = load_manifest(bundle)  # a clear error before any data is read
    if plot_path:
        render.require_matplotlib()  # before minutes of measuring, not after
    chw = tuple(int(d) for d in manifest.input.shape[1:])
    if (data is None) == (random_n is None):
        raise UserError("Give exactly one of --data DATA (accuracy and speed) or --random N (speed only).")
    if data is not None:
        from .data import rows_for_bundle

        x = rows_for_bundle(manifest, data, ("test",), where=bundle, data_dir=data_dir,
                            repeat_channels=repeat_channels)["test"]  # read in batches, never whole
        if limit:
            x = x.select(np.arange(min(limit, len(x))))
        y = None
        info = {"spec": data, "split": "test", "samples": len(x), "labelled": True,
                "description": f"{data} test split ({len(x)} samples)"}
    else:
        if random_n < 1:
            raise UserError("--random needs a positive number of samples.")
        x = np.random.default_rng(0).standard_normal((random_n, *chw), dtype=np.float32)
        y = None
        info = {"spec": "random", "split": None, "samples": random_n, "labelled": False,
                "description": f"{random_n} random inputs (speed only)"}
    options = bench_mod.BenchOptions(
        batch_sizes=_int_list(batch_sizes, "--batch-sizes"), warmup_ms=warmup_ms, min_iterations=min_iterations,
        min_seconds=min_seconds, thresholds=_float_list(thresholds, "--thresholds") if thresholds else None,
        sweep=sweep, exit_times=exit_times, timing_bytes=timing_mb << 20)
    # TensorRT: a graph per segment and bucket; ONNX Runtime: fixed buffers and a graph per slot, which
    # needs --providers cuda (its runner says so otherwise).
    runner_options: dict = {"cuda_graphs": True} if cuda_graphs else {}
    runner_options.update(_runner_options(manifest.backend, backend, providers))
    report = bench_mod.run_bench(bundle, x, y, options, data_info=info, backend=backend,
                                 runner_options=runner_options or None)
    bench_mod.check_report(report)
    render.bench_tables(report)
    if json_path:
        click.echo(f"wrote {bench_mod.write_json(report, json_path)}")
    if plot_path:
        click.echo(f"wrote {render.bench_plot(report, plot_path)}")


@main.command("profile")
@click.argument("bundle", type=click.Path())
@click.option("--batch-size", "batch_sizes", default="1", show_default=True,
              help="Batch size(s) to time, comma-separated (calibrate --cost uses one: the size you serve at).")
@click.option("--backend", default=None, help="Run on another backend than the bundle's (e.g. onnxruntime).")
@click.option("--providers", default=None, metavar="LIST",
              help="ONNX Runtime: execution providers in priority order, e.g. cuda [default: cpu].")
@click.option("--min-seconds", default=2.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              callback=lambda _ctx, param, value: _finite(param, value),
              help="Timed seconds per exit and batch size, at least.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Profile to write (JSON).")
def profile_cmd(bundle, batch_sizes, backend, providers, min_seconds, output):
    """Measure the time of leaving at each exit of BUNDLE, relative to its un-gated baseline.

    Every sample is sent out at exit k (k = 0..K), timed interleaved with the baseline on the same
    backend (bench --exit-times' measurement). `calibrate --cost profile.json` then chooses thresholds
    for the least expected measured time instead of the least FLOPs, under the same accuracy promise.
    """
    from . import profile as profile_mod
    from .manifest import load_manifest
    from .outputs import check_output

    check_output(output, reads=(bundle,))
    manifest = load_manifest(bundle)
    options = _runner_options(manifest.backend, backend, providers)
    result = profile_mod.measure(bundle, _int_list(batch_sizes, "--batch-size"), backend=backend,
                                 runner_options=options, min_seconds=min_seconds)
    for entry in result["batches"]:
        cells = ", ".join(f"exit {k} {c:.3f}" for k, c in enumerate(entry["exit_time_costs"]))
        click.echo(f"batch {entry['batch_size']}: time of leaving at each exit / un-gated: {cells}")
    click.echo(f"wrote {profile_mod.write_profile(result, output)}")


def _finite(param: click.Parameter, value: float) -> float:
    """A click callback: nan passes FloatRange (every comparison with it is false); refuse it at parse time."""
    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number.", param=param)
    return value


def _runner_options(bundle_backend: str, backend: str | None, providers: str | None) -> dict:
    if not providers:
        return {}
    if (backend or bundle_backend) != "onnxruntime":
        raise UserError(f"--providers applies to ONNX Runtime only; this run is on {backend or bundle_backend}.",
                        "Drop --providers, or add --backend onnxruntime to run the bundle's ONNX graphs.")
    return {"providers": [p.strip() for p in providers.split(",") if p.strip()]}


def _calibration_target_options(command):
    """--max-drop, --guarantee, --delta, --budget, --upper-bound and --holdout: what the thresholds are chosen
    for (gate, calibrate)."""
    options = [
        click.option("--max-drop", type=float, default=None,
                     help="Allowed accuracy drop (default 0.01): on new data with probability >= 1 - delta "
                          "(--guarantee ltt), or on the validation rows (--guarantee none)."),
        click.option("--guarantee", type=click.Choice(["ltt", "none"]), default="ltt", show_default=True,
                     help="ltt: Learn then Test, the --max-drop promise holds on new data from the same "
                          "distribution with probability >= 1 - delta (exact binomial bounds); none: the drop "
                          "is held on the validation rows only (or its --upper-bound)."),
        click.option("--delta", type=float, default=0.1, show_default=True,
                     help="--guarantee ltt: the promise may fail with probability at most delta, in (0, 1)."),
        click.option("--budget", type=float, default=None, help="Expected FLOPs as a fraction of the un-gated model."),
        click.option("--upper-bound", type=float, default=None, metavar="LEVEL",
                     help="Hold the drop's one-sided upper confidence bound at LEVEL (e.g. 0.9) to --max-drop, not "
                          "the drop measured on validation: the promise then holds on new data more often (costs "
                          "FLOPs)."),
        click.option("--holdout", type=float, default=None, metavar="FRACTION",
                     help="Keep this fraction of the validation rows (e.g. 0.3) out of the choice and report the "
                          "thresholds on them: what the promise is worth on new data, without the test split."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _target(max_drop, guarantee, delta, budget, upper_bound, holdout):
    """The calibration target flags as a calibrate.Target (checked now, before any data is read)."""
    from .calibrate import Target

    if max_drop is not None and budget is not None:
        raise UserError("Give --max-drop or --budget, not both.",
                        "--max-drop keeps accuracy; --budget caps the expected FLOPs.")
    return Target(max_drop=max_drop, budget=budget, guarantee=guarantee, delta=delta, upper_bound=upper_bound,
                  holdout=holdout)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", default=None, type=click.Path(), help="Bundle directory [default: engines/<model stem>].")
@click.option("--backend", default="onnxruntime", show_default=True, help="onnxruntime or tensorrt.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="fp16: graphs exported from the half model; int8: static quantization (QDQ), calibrated on "
                   "--calibration-data (docs/precision.md).")
@click.option("--calibration-data", default=None, metavar="DATA",
              help="int8: the data set whose TRAINING rows calibrate the quantization and whose validation rows "
                   "(the split the model records) fit the thresholds: a data spec (fashion-mnist, npz:PATH, ...). "
                   "fp16: its validation rows refit the thresholds to the fp16 bundle's own confidences. The refit's "
                   "target: the target flags given, else the one MODEL was calibrated for.")
@click.option("--calibration-rows", default=None, type=int, metavar="N",
              help="int8: training rows that calibrate the activation ranges [default: 512].")
@click.option("--data-dir", default=None, type=click.Path(), help="int8: folder of the Fashion-MNIST IDX files.")
@click.option("--repeat-channels", is_flag=True, help="int8: repeat 1-channel data to the model's channel count.")
@_calibration_target_options
@click.option("--max-batch", default=256, show_default=True, type=click.IntRange(min=1),
              help="Largest batch the bundle accepts (every batch dimension is dynamic in 1..max).")
@click.option("--opset", default=None, type=int, help="ONNX opset [default: the exporter's].")
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto", show_default=True,
              help="torch.onnx exporter: dynamo (current), torchscript (deprecated; faster); auto: dynamo, and "
                   "torchscript if dynamo's graphs fail to export or fail the ONNX checker (the output says so).")
@click.option("--force", is_flag=True, help="Replace an existing bundle (only after the new one is built).")
@click.option("--opt-batch", default=None, type=click.IntRange(min=1),
              help="TensorRT: the batch size the engines are tuned for [default: max batch].")
@click.option("--workspace-mb", default=None, type=click.IntRange(min=1), help="TensorRT: workspace limit in MiB.")
@click.option("--timing-cache", default=None, type=click.Path(dir_okay=False),
              help="TensorRT: start from this timing cache (e.g. an earlier bundle's timing.cache).")
@click.option("--hardware-compatible", is_flag=True,
              help="TensorRT: engines that run on any Ampere or newer GPU (slower; see docs/tensorrt.md).")
@click.option("--tf32", is_flag=True, help="TensorRT: allow TF32 math in fp32 engines.")
def build(model, output, backend, precision, calibration_data, calibration_rows, data_dir, repeat_channels, max_drop,
          guarantee, delta, budget, upper_bound, holdout, max_batch, opset, exporter, force, opt_batch, workspace_mb, timing_cache,
          hardware_compatible, tf32):
    """Build a bundle from a gated MODEL (model.pt): per-segment ONNX graphs, engines, manifest.json.

    Every graph passes the ONNX checker and a parity check against the torch model (same exit
    decisions, logits within tolerance) before the bundle is renamed into place; a failure at any
    step leaves nothing behind.
    """
    from .compile.build import BuildOptions, build_bundle

    trt = {"opt_batch": opt_batch, "workspace_mb": workspace_mb, "timing_cache": timing_cache,
           "hardware_compatible": hardware_compatible or None, "tf32": tf32 or None}
    trt = {k: v for k, v in trt.items() if v is not None}
    if trt and backend != "tensorrt":
        flags = ", ".join("--" + k.replace("_", "-") for k in trt)
        raise UserError(f"{flags} only apply to --backend tensorrt.", "Drop them, or build for TensorRT.")
    calibration = _calibration_data(precision, calibration_data, calibration_rows, data_dir, repeat_channels,
                                    max_drop, guarantee, delta, budget, upper_bound, holdout)
    if calibration is not None and not _given(TARGET_FLAGS):
        calibration.target = None  # the refit's target: the one the model records (else the default)
    build_bundle(model, output, BuildOptions(backend=backend, precision=precision, max_batch=max_batch, opset=opset,
                                             exporter=exporter, force=force, backend_options=trt,
                                             calibration=calibration), progress=click.echo)


TARGET_FLAGS = ("max_drop", "guarantee", "delta", "budget", "upper_bound", "holdout")


def _given(params) -> bool:
    """Whether any of the current command's `params` was given on the command line (not a default)."""
    ctx = click.get_current_context()
    return any(ctx.get_parameter_source(p) not in (None, click.core.ParameterSource.DEFAULT) for p in params)


def _calibration_data(precision, data, rows, data_dir, repeat_channels, max_drop, guarantee, delta, budget,
                      upper_bound, holdout):
    """build's calibration data (int8: required; fp16: optional refit), or None; its flags without
    --precision int8 / fp16 are refused."""
    from .calibrate import DEFAULT_DELTA
    from .compile.quantize import CALIBRATION_ROWS, CalibrationData

    given = {"--calibration-data": data, "--calibration-rows": rows, "--data-dir": data_dir,
             "--repeat-channels": repeat_channels or None, "--max-drop": max_drop, "--budget": budget,
             "--upper-bound": upper_bound, "--holdout": holdout,
             "--guarantee": None if guarantee == "ltt" else guarantee, "--delta": None if delta == DEFAULT_DELTA else delta}
    if precision == "fp16" and data is not None:
        # fp16 confidences differ from the torch model's: refit the thresholds on the fp16 bundle itself.
        if rows is not None:
            raise UserError("--calibration-rows only applies to --precision int8.", "Drop it.")
        return CalibrationData(data=data, data_dir=data_dir, repeat_channels=repeat_channels,
                               target=_target(max_drop, guarantee, delta, budget, upper_bound, holdout))
    if precision != "int8":
        flags = [k for k, v in given.items() if v is not None]
        if flags:
            raise UserError(f"{', '.join(flags)} only apply to --precision int8, or fp16 with --calibration-data.",
                            "Drop them, or build int8 / fp16.")
        return None
    if data is None:
        raise UserError("--precision int8 needs --calibration-data.",
                        "Add --calibration-data DATA (fashion-mnist, or npz:PATH): its training rows calibrate the "
                        "quantization, its validation rows fit the thresholds.")
    return CalibrationData(data=data, rows=CALIBRATION_ROWS if rows is None else rows, data_dir=data_dir,
                           repeat_channels=repeat_channels,
                           target=_target(max_drop, guarantee, delta, budget, upper_bound, holdout))


@main.command("inspect")
@click.argument("path", type=click.Path())
def inspect_cmd(path):
    """Describe a bundle directory (and verify its hashes) or a gated checkpoint file."""
    from pathlib import Path

    target = Path(path)
    if target.is_dir():
        from .manifest import check_files, load_manifest, raise_if_damaged
        from .render import bundle_tables

        manifest = load_manifest(target)
        checks = check_files(manifest)
        bundle_tables(target, manifest, checks)  # first: a damaged bundle still shows what it claims to be
        raise_if_damaged(target, checks)
    elif target.is_file():
        from .compile.checkpoint import summarize
        from .render import checkpoint_tables

        checkpoint_tables(summarize(target))
    else:
        raise UserError(f"{path}: no such file or directory.",
                        "Give a bundle directory (engines/NAME) or a gated checkpoint (model.pt).")


@main.command("score")
@click.argument("bundle", type=click.Path())
@click.option("--data", required=True,
              help="fashion-mnist, npz:PATH, npy:DIR or folder:PATH (its --split; an npz with only `x`, or a folder "
                   "of images without class folders, is scored whole, without labels).")
@click.option("--data-dir", default=None, type=click.Path(), help="Folder of the Fashion-MNIST IDX files.")
@click.option("--repeat-channels", is_flag=True, help="Repeat 1-channel data to the model's channel count.")
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", show_default=True,
              help="The split of DATA to score; val: the validation rows the bundle's thresholds were calibrated on "
                   "(the split it records), train: the other training rows.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Score only the first N rows.")
@click.option("-o", "--output", required=True, type=click.Path(),
              help="File to write: NAME.parquet (needs pyarrow: the [parquet] extra) or NAME.csv.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Score on Ray Data: alone, on a local Ray instance started for the job; with ADDRESS "
                   "(ray://HOST:10001, auto), on that cluster. [default: in-process]")
@click.option("--actors", type=click.IntRange(min=1), default=None,
              help="Ray: actors in the pool [default: as many as the cluster's CPUs hold].")
@click.option("--cpus-per-actor", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Ray: CPUs each actor reserves (and ONNX Runtime threads it uses).")
@click.option("--max-retries", type=click.IntRange(min=0), default=None,
              help="Ray: restarts of an actor whose process died, and retries of its batch, before the job fails "
                   "naming the batch [default: 3].")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Rows per batch.")
@click.option("--thresholds", default=None, help="Override the bundle's thresholds: a,b,c (one per gate).")
@click.option("--logits", is_flag=True, help="Also write each row's class scores (column logits).")
@click.option("--force", is_flag=True, help="Replace an existing output (only once the new one is complete).")
@click.option("--progress/--no-progress", default=True, help="Progress bar on stderr.")
def score_cmd(bundle, data, data_dir, repeat_channels, split, limit, output, ray_address, actors, cpus_per_actor,
              max_retries, batch_size, thresholds, logits, force, progress):
    """Classify every row of DATA with BUNDLE into a parquet or CSV file, in-process or on Ray Data.

    One output row per input row, in input order: row, prediction, exit (0..K-1 the gate taken, K the
    full network), confidence, label (when the data has labels), logits (with --logits). Prints exit
    fractions, accuracy when labels exist, and samples/s. The file appears only once it is complete.
    """
    import numpy as np

    from .data import data_file, recorded_split, rows_for_bundle
    from .manifest import load_manifest
    from .score import check_output, check_ray, score

    check_output(Path(output), force, reads=(bundle, data_file(data)))
    if ray_address is not None:
        check_ray(ray_address)  # before the data is loaded
    manifest = load_manifest(bundle)  # a clear error before any data is read
    if ray_address is None and (actors is not None or cpus_per_actor != 1.0 or max_retries is not None):
        raise UserError("--actors, --cpus-per-actor and --max-retries apply to --ray only.", "Add --ray, or drop them.")
    val_size, seed = recorded_split((manifest.source or {}).get("data_split"), str(bundle))
    # read in batches; a test split may be unlabelled (an npz with only x, a folder without class folders)
    rows = rows_for_bundle(manifest, data, (split,), where=bundle, data_dir=data_dir, repeat_channels=repeat_channels,
                           val_size=val_size, seed=seed, labelled=None if split == "test" else True)[split]
    if limit:
        rows = rows.select(np.arange(min(limit, len(rows))))
    summary = score(bundle, rows, None, output, ray=ray_address, actors=actors, cpus_per_actor=cpus_per_actor,
                    batch_size=batch_size, thresholds=_float_list(thresholds, "--thresholds") if thresholds else None,
                    logits=logits, force=force, progress=progress, max_retries=max_retries,
                    describe=f"of {data}{'' if split == 'test' else f' ({split} split)'} with {bundle}")
    for line in summary.lines():
        click.echo(line)
    click.echo(f"wrote {output} (columns {', '.join(summary.columns)})")


@main.command("drift")
@click.argument("bundle", type=click.Path())
@click.option("--metrics", "metrics_url", default=None, metavar="URL",
              help="A running server's metrics (serve's --metrics-port, e.g. 127.0.0.1:8002, or Triton's): the "
                   "samples it answered with the bundle's thresholds, per exit.")
@click.option("--window", default=None, type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="--metrics: test the samples served during the next SECONDS (two reads), not all since the start.")
@click.option("--model", default=None, help="--metrics: the gate model's name [default: the bundle's].")
@click.option("--scores", default=None, type=click.Path(dir_okay=False),
              help="A `dgate-export score` output (.parquet or .csv) made with the bundle's thresholds.")
@click.option("--alpha", default=0.001, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="False-alarm probability: the test raises the alarm when p < alpha.")
@click.option("--record", "record_data", default=None, metavar="DATA",
              help="Instead: record BUNDLE's exit mix on the validation split it records of DATA (fashion-mnist, "
                   "npz:PATH) as its reference, for bundles built without one.")
@click.option("--data-dir", default=None, type=click.Path(), help="--record: folder of the Fashion-MNIST IDX files.")
@click.option("--repeat-channels", is_flag=True, help="--record: repeat 1-channel data to the model's channels.")
def drift_cmd(bundle, metrics_url, window, model, scores, alpha, record_data, data_dir, repeat_channels):
    """Is the exit mix still the one BUNDLE's thresholds were calibrated on?

    Compares the samples per exit served by a running server (--metrics) or scored into a file
    (--scores) with the exit mix the bundle records for its calibration rows: Pearson's chi-square test
    of homogeneity, alarm when p < --alpha. Exit status 0: no drift; 1: drift; 2: an error.
    """
    import time as clock

    from .drift import (
        exit_mix_test,
        read_metrics,
        record_reference,
        reference_of,
        scored_exit_counts,
        served_exit_counts,
    )
    from .manifest import load_manifest

    manifest = load_manifest(bundle)
    if record_data is not None:
        if metrics_url is not None or scores is not None:
            raise UserError("--record writes the reference; --metrics and --scores test against it.", "Run them apart.")
        ref = record_reference(bundle, record_data, data_dir=data_dir, repeat_channels=repeat_channels)
        click.echo(f"recorded in {bundle}/manifest.json: exit fractions "
                   f"{' '.join(f'{f:.4f}' for f in ref.fractions)} on {ref.rows} rows ({ref.where})")
        return
    if (metrics_url is None) == (scores is None):
        raise UserError("Give exactly one of --metrics URL (a running server) and --scores FILE (score's output).")
    if scores is not None and (window is not None or model is not None):
        raise UserError("--window and --model apply to --metrics only.", "Drop them.")
    reference = reference_of(manifest)
    exits = manifest.num_gates + 1
    if scores is not None:
        observed = scored_exit_counts(scores, exits)
        source = f"{scores}"
    else:
        name = model or manifest.name
        observed = served_exit_counts(read_metrics(metrics_url), name, exits)
        source = f"{metrics_url} (gate model {name}, since it started)"
        if window is not None:
            clock.sleep(window)
            observed = served_exit_counts(read_metrics(metrics_url), name, exits) - observed
            source = f"{metrics_url} (gate model {name}, {window:g} s)"
            if (observed < 0).any():
                raise UserError("The server restarted during the window (its counters went back).", "Run it again.")
    test = exit_mix_test(reference.counts, observed, alpha)
    names = [s.gate.exit for s in manifest.segments if s.gate is not None] + ["full network"]
    click.echo(f"reference: {reference.rows} calibration rows ({reference.where}); observed: {int(observed.sum())} "
               f"samples from {source}")
    click.echo(f"{'exit':<24}{'calibration':>12}{'observed':>10}")
    for k, label in enumerate(names):
        click.echo(f"{k} {label:<22}{reference.fractions[k]:>12.2%}{test.fractions(observed)[k]:>10.2%}")
    click.echo(test.sentence())
    if test.alarm:
        sys.exit(1)


# --- gate and calibrate ------------------------------------------------------------------------------



class _GateCommand(click.Command):
    """`gate --help` ends with the architecture zoo (imports torch only when help is shown)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        try:
            from .compile.zoo import list_archs
        except ModuleNotFoundError as missing:
            err = missing_extra(missing)
            if err is None:
                raise
            with formatter.section("Architectures (--arch)"):
                formatter.write_text(str(err))
            return

        rows = [(a.name, a.description + (f"; exits {', '.join(a.default_exits)}" if a.default_exits else ""))
                for a in list_archs()]
        rows.append(("torchvision/NAME", "any torchvision classifier, random init (train it or give --weights)"))
        with formatter.section("Architectures (--arch)"):
            formatter.write_dl(rows)


def _print_calibration(result, test, exits, *, shared_test: str | None = None) -> None:
    """The calibration report: the tables, then how the thresholds were chosen (and, with `shared_test`, the
    data set whose test figures include rows seen in training and calibration)."""
    from .render import calibration_tables

    calibration_tables(result, test, exits)
    if shared_test is not None:
        click.echo(f"note: {shared_test} has no separate test arrays (x_test, y_test): the test "
                   "figures include rows used for training and calibration.")
    click.echo(f"calibration: {result.method}")
    if result.cost:
        click.echo(f"expected measured time: {result.cost['expected']:.3f} x the un-gated model's "
                   f"({result.cost['description']})")


def _wrote(files) -> None:
    click.echo(f"wrote {files.path}, {files.curve_json}, {files.curve_png}")


@main.command(cls=_GateCommand)
@click.option("--arch", required=True, help="Architecture name (see the list below).")
@click.option("--arch-kwargs", default=None, metavar="JSON", help='Constructor arguments, e.g. \'{"width": 8}\'.')
@click.option("--weights", default=None, type=click.Path(), help="Backbone state_dict (.pth); without it the "
              "backbone is trained on DATA first.")
@click.option("--exits", default=None, help="Comma-separated module names to gate after (default: the zoo's).")
@click.option("--data", required=True, help="fashion-mnist, npz:PATH, npy:DIR or folder:PATH (docs: data specs).")
@click.option("--data-dir", default=None, type=click.Path(), help="Folder of the Fashion-MNIST IDX files.")
@click.option("--repeat-channels", is_flag=True, help="Repeat 1-channel data to the model's channel count.")
@click.option("--image-size", default=None, type=click.IntRange(min=1),
              help="folder: data: the square input size images are centre-cropped to (e.g. 224).")
@click.option("--resize", default=None, type=click.IntRange(min=1),
              help="folder: data: resize the shorter side to this first (e.g. 256) [--image-size].")
@click.option("--normalize", default=None, metavar="imagenet|none|MEAN/STD",
              help="Raw pixels (folder:, uint8 arrays): ImageNet's mean and std, none ([0, 1] only), or MEAN/STD "
                   "on [0, 1] pixels (one value or one per channel) [imagenet for 3 channels, else none; "
                   "Fashion-MNIST: its own]. Recorded in model.pt and the bundle.")
@click.option("--val-size", default=None, type=click.IntRange(min=1),
              help=f"Validation rows held out of training [10% of the training rows, at most {DEFAULT_VAL_SIZE}].")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(min=1),
              help="Gate training epochs on cached features (at least 1000 optimizer steps in all: small data "
                   "trains for more epochs).")
@click.option("--backbone-epochs", default=2, show_default=True, help="Backbone epochs when there are no --weights.")
@click.option("--batch-size", default=128, show_default=True, help="Backbone training batch size.")
@click.option("--head", default="linear", show_default=True,
              help="Gate head: linear (global pooling + linear, the paper's), mlp (+ one hidden layer), grid (grid "
                   "pooling, 4x4 cells, + one hidden layer), or a head registered with register_head in an "
                   "--import module.")
@click.option("--feature-layout", default="auto", show_default=True, metavar="LAYOUT[,LAYOUT...]",
              help="Layout of the exits' outputs, one for all or one per exit: auto (detected from the exit's "
                   "modules), nchw (channels first), nhwc (channels last, e.g. Swin), tokens-cls ([N, tokens, "
                   "hidden] with a class token first, e.g. ViT) or tokens-mean (averaged over tokens).")
@click.option("--confidence", default=DEFAULT_CONFIDENCE, show_default=True, type=click.Choice(CONFIDENCES))
@click.option("--loss", default="ce", show_default=True, type=click.Choice(["ce", "hinge"]),
              help="Gate loss: cross-entropy or multi-class hinge.")
@_calibration_target_options
@click.option("--seed", default=0, show_default=True, help="Seed of the validation split and of training.")
@click.option("--progress/--no-progress", default=True, help="Progress bars on stderr.")
@click.option("-o", "--output", required=True, type=click.Path(), help="Gated model to write (model.pt).")
def gate(arch, arch_kwargs, weights, exits, data, data_dir, repeat_channels, image_size, resize, normalize, val_size,
         epochs, backbone_epochs, batch_size, head, feature_layout, confidence, loss, max_drop, guarantee, delta, budget, upper_bound, holdout,
         seed, progress, output):
    """Attach d-gates to a backbone, train them, calibrate their thresholds, save model.pt.

    The backbone stays frozen while the gates train. Thresholds are chosen on the validation split
    (never the test split) and the result is reported on the test split. The accuracy-vs-cost curve
    is written next to the output (model.curve.json, model.curve.png).
    """
    import json

    from .compile.gate import GateOptions, gate_backbone

    target = _target(max_drop, guarantee, delta, budget, upper_bound, holdout)
    try:
        kwargs = json.loads(arch_kwargs) if arch_kwargs else {}
    except json.JSONDecodeError as err:
        raise UserError(f"--arch-kwargs is not valid JSON ({err}).", 'Write it like \'{"width": 8}\'.') from err
    if not isinstance(kwargs, dict):
        raise UserError("--arch-kwargs must be a JSON object.", 'Write it like \'{"width": 8}\'.')
    layouts = [v.strip() for v in feature_layout.split(",") if v.strip()] or ["auto"]
    options = GateOptions(
        arch=arch, data=data, output=output, arch_kwargs=kwargs, weights=weights,
        exits=[e.strip() for e in exits.split(",") if e.strip()] if exits else None, data_dir=data_dir,
        repeat_channels=repeat_channels, image_size=image_size, resize=resize, normalize=normalize,
        val_size=val_size, epochs=epochs, backbone_epochs=backbone_epochs,
        batch_size=batch_size, head=head, feature_layout=layouts[0] if len(layouts) == 1 else layouts,
        confidence=confidence, loss=loss, target=target, seed=seed, progress_bars=progress)
    gated = gate_backbone(options, progress=click.echo)
    _print_calibration(gated.calibration, gated.test, gated.model.exits,
                       shared_test=None if gated.separate_test else data)
    _wrote(gated.files)


@main.command("calibrate")
@click.argument("model_path", metavar="[MODEL]", type=click.Path(), required=False)
@click.option("--engine", "bundle", default=None, type=click.Path(file_okay=False),
              help="Calibrate this bundle instead of MODEL: run its own segments (its precision, its backend) on "
                   "the validation rows and rewrite only the thresholds (and a record of the choice) in its "
                   "manifest.json.")
@click.option("--data", required=True, help="fashion-mnist, npz:PATH, npy:DIR or folder:PATH (the same data the gates "
              "were trained on; images prepared as MODEL or the bundle records).")
@click.option("--data-dir", default=None, type=click.Path(), help="Folder of the Fashion-MNIST IDX files.")
@click.option("--repeat-channels", is_flag=True, help="Repeat 1-channel data to the model's channel count.")
@click.option("--val-size", default=None, type=int, help=f"Validation rows [the split MODEL records, else {DEFAULT_VAL_SIZE}].")
@click.option("--seed", default=None, type=int, help="Seed of the validation split [MODEL's, else 0].")
@_calibration_target_options
@click.option("--confidence", default=None, type=click.Choice(CONFIDENCES),
              help="Switch the confidence measure (default: the model's).")
@click.option("--cost", "cost_path", default=None, type=click.Path(dir_okay=False), metavar="PROFILE",
              help="Minimize the expected measured time of `dgate-export profile`'s PROFILE (JSON) instead of FLOPs; "
                   "--budget is then a fraction of the un-gated model's time.")
@click.option("--cost-batch", default=None, type=int, help="The batch size of PROFILE to use [its only one].")
@click.option("--progress/--no-progress", default=True, help="Progress bars on stderr.")
@click.option("-o", "--output", default=None, type=click.Path(), help="Write here instead of overwriting MODEL.")
def calibrate_cmd(model_path, bundle, data, data_dir, repeat_channels, val_size, seed, max_drop, guarantee, delta,
                  budget, upper_bound, holdout, confidence, cost_path, cost_batch, progress, output):
    """Choose new thresholds for a gated MODEL, or a bundle (--engine), without retraining.

    The validation split must be the one `gate` held out (same --data), so that thresholds are never
    chosen on rows the gates were trained on: MODEL (and a bundle built from it) records its size and
    seed, and they are used.
    """
    target = _target(max_drop, guarantee, delta, budget, upper_bound, holdout)

    def warn(line: str) -> None:
        click.echo(line, err=True)

    if bundle is not None:
        from .recalibrate import calibrate_bundle

        given = {"MODEL": model_path, "-o": output, "--confidence": confidence}
        extra = [k for k, v in given.items() if v is not None]
        if extra:
            raise UserError(f"calibrate --engine rewrites the bundle's manifest in place; {', '.join(extra)} "
                            "do not apply (the confidence measure is built into its graphs).",
                            f"Drop {', '.join(extra)}.")
        done = calibrate_bundle(bundle, data, target=target, data_dir=data_dir, repeat_channels=repeat_channels,
                                val_size=val_size, seed=seed, cost_path=cost_path, cost_batch=cost_batch, warn=warn)
        _print_calibration(done.calibration, done.test, done.exits)
        click.echo(f"thresholds {[round(t, 4) for t in done.previous]} -> "
                   f"{[round(t, 4) for t in done.calibration.thresholds]}; rewrote {bundle}/manifest.json "
                   "(artifacts unchanged, hashes verified)")
        return
    if model_path is None:
        raise UserError("calibrate needs a gated MODEL (model.pt) or --engine BUNDLE.",
                        "e.g. dgate-export calibrate model.pt --data fashion-mnist.")
    from .compile.gate import calibrate_checkpoint

    done = calibrate_checkpoint(model_path, data, target=target, output=output, confidence=confidence,
                                data_dir=data_dir, repeat_channels=repeat_channels, val_size=val_size, seed=seed,
                                cost_path=cost_path, cost_batch=cost_batch, progress_bars=progress, warn=warn)
    _print_calibration(done.calibration, done.test, done.model.exits,
                       shared_test=None if done.separate_test else data)
    _wrote(done.files)


def _serving_options(f):
    """Options shared by `triton` and `serve`: how the repository's models run."""
    options = [
        click.option("--instances", default=8, show_default=True, type=click.IntRange(min=1),
                     help="Instances of the gate model: requests whose early-exit loops run at once (their "
                          "survivors meet in the segment models' queues)."),
        click.option("--segment-instances", default=1, show_default=True, type=click.IntRange(min=1),
                     help="Instances of each segment model."),
        click.option("--max-queue-delay-us", default=0, show_default=True, type=click.IntRange(min=0),
                     help="How long a segment model's dynamic batcher waits for more requests to merge."),
        click.option("--kind", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
                     help="Where the segment models run."),
        click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1),
                     help="ONNX Runtime intra-op threads per segment instance."),
        click.option("--name", default=None, help="Name of the gate model [default: the bundle's]."),
        click.option("--gate-batching", is_flag=True,
                     help="Dynamic batching for the gate model too: requests with the same thresholds share one "
                          "chain of segment calls (requests of at most max-batch rows; [N] outputs as [N, 1])."),
        click.option("--unbatched", is_flag=True,
                     help="Also write NAME_unbatched: the gated chain without dynamic batching (for comparisons)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@main.command("triton")
@click.argument("bundle", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="The model repository folder to write.")
@click.option("--platform", type=click.Choice(["auto", "onnxruntime", "tensorrt", "python"]), default="auto",
              show_default=True, help="How segments run: Triton's ONNX Runtime or TensorRT backend, or python "
                                      "(ONNX Runtime inside the Python backend, for servers that only have it). "
                                      "auto: the bundle's backend.")
@_serving_options
@click.option("--force", is_flag=True, help="Replace an existing repository (only once the new one is written).")
def triton_cmd(bundle, output, platform, instances, segment_instances, max_queue_delay_us, kind, threads, name,
               gate_batching, unbatched, force):
    """Write a Triton Inference Server model repository for BUNDLE (docs/serving.md).

    One model per segment with dynamic batching (the survivors of concurrent requests are merged at
    every segment), the un-gated baseline, and the gate model NAME (Python backend, BLS) that answers
    requests with the same results as GatedRuntime.run.
    """
    from .serving import write_repository

    info = write_repository(bundle, output, platform=platform, instances=instances,
                            segment_instances=segment_instances, max_queue_delay_us=max_queue_delay_us,
                            kind=kind, threads=threads, name=name, unbatched=unbatched, gate_batching=gate_batching,
                            force=force)
    click.echo(f"wrote {info.path} (platform {info.platform}): {', '.join(info.models)}")
    click.echo(f"serve it: tritonserver --model-repository {info.path}   (see {info.path}/README.md)")


@main.command("serve")
@click.argument("bundle", type=click.Path())
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="HTTP port.")
@click.option("--grpc-port", default=8001, show_default=True, type=click.IntRange(1, 65535), help="gRPC port.")
@click.option("--repo", default=None, type=click.Path(),
              help="Write the model repository here (kept) instead of a temporary folder.")
@click.option("--platform", type=click.Choice(["auto", "onnxruntime", "tensorrt", "python"]), default="auto",
              show_default=True, help="auto: onnxruntime or tensorrt where the server has that backend, else python.")
@_serving_options
@click.option("--triton-env", default=None, type=click.Path(file_okay=False),
              help="Python environment holding nvidia-pytriton [default: $DGATE_TRITON_ENV, else .venv-triton].")
@click.option("--metrics-port", default=8002, show_default=True, type=click.IntRange(1, 65535),
              help="Prometheus metrics: Triton's, the gate model's counters and serve's (health, drift).")
@click.option("--metrics-address", default="127.0.0.1", show_default=True,
              help="Address of the metrics endpoint (0.0.0.0 for a scraper outside the host or container).")
@click.option("--log-file", default=None, type=click.Path(dir_okay=False),
              help="The server's log [default: TMPDIR/dgate-serve-PID.log, removed after a clean stop, kept "
                   "otherwise].")
@click.option("--drain-timeout", default=30.0, show_default=True, type=float,
              help="Seconds the requests in flight get to finish after SIGINT / SIGTERM.")
@click.option("--probe-interval", default=2.0, show_default=True, type=float,
              help="Seconds between two health inferences through the gate model.")
@click.option("--probe-timeout", default=30.0, show_default=True, type=float,
              help="A health inference not answered in this many seconds is a failure.")
@click.option("--max-restarts", default=3, show_default=True, type=click.IntRange(min=0),
              help="Restarts after failures allowed within 10 minutes; one more ends serve with an error.")
@click.option("--drift-window", default=5000, show_default=True, type=click.IntRange(min=0),
              help="Served samples per drift test of the exit mix (0: off).")
@click.option("--drift-alpha", default=0.001, show_default=True, type=float,
              help="False-alarm probability of each drift test.")
def serve_cmd(bundle, port, grpc_port, repo, platform, instances, segment_instances, max_queue_delay_us, kind,
              threads, name, gate_batching, unbatched, triton_env, metrics_port, metrics_address, log_file,
              drain_timeout, probe_interval, probe_timeout, max_restarts, drift_window, drift_alpha):
    """Serve BUNDLE with a local Triton Inference Server on 127.0.0.1 until Ctrl-C / SIGTERM.

    Writes the model repository (see `triton`), starts tritonserver, waits until every model is
    ready, prints the endpoints and an example request, and supervises it: a failed health inference,
    a dead model process or a dead server restarts it. Ctrl-C / SIGTERM drains (readiness false, the
    requests in flight finish), then stops. Exit status 0 after a clean stop, 1 when the drain cut
    requests, 2 when the server failed for good (docs/serving.md, "Operating the server").
    """
    from .serving.serve import Settings, serve_bundle

    settings = Settings(drain_timeout=drain_timeout, probe_interval=probe_interval, probe_timeout=probe_timeout,
                        max_restarts=max_restarts, drift_window=drift_window, drift_alpha=drift_alpha)
    status = serve_bundle(bundle, port=port, grpc_port=grpc_port, metrics_port=metrics_port,
                          metrics_address=metrics_address, repo=repo, platform=platform, triton_env=triton_env,
                          log_file=log_file, settings=settings, echo=click.echo, repository_options={
                              "instances": instances, "segment_instances": segment_instances,
                              "max_queue_delay_us": max_queue_delay_us, "kind": kind, "threads": threads,
                              "name": name, "unbatched": unbatched, "gate_batching": gate_batching})
    if status:
        sys.exit(status)
