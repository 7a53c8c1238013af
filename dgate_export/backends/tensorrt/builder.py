"""Build one TensorRT engine per segment from its ONNX graph (TensorRT 10 and 11, one code path).

- The network is strongly typed wherever TensorRT offers it (TensorRT 11 always is): fp32 and fp16
  come from the exported graph's own types, so the same fp16 ONNX serves both versions. Only a
  TensorRT without strong typing gets the FP16 builder flag instead (feature-detected).
- int8 is explicit quantization: the graph's QuantizeLinear / DequantizeLinear nodes (symmetric int8,
  as `build --precision int8 --backend tensorrt` writes them) say where TensorRT computes in int8. It
  needs a strongly typed network and no INT8 flag or calibrator (TensorRT 11 has neither); a graph
  without Q/DQ layers is refused, since it would silently build fp32.
- One optimization profile covers batch 1..max_batch for every input (`index` and the carries too).
- One timing cache is shared by all segments of a bundle: each build starts from `timing.cache` in the
  bundle (or from options["timing_cache"] for the first segment) and writes it back.

Imports tensorrt at module level: import this module only after `available()` said TensorRT is here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tensorrt as trt

from ...errors import UserError
from ...files import write_bytes_atomic
from . import cuda
from ._log import CapturingLogger
from .common import ENGINE_SUFFIX, INSTALL_HINT, TIMING_CACHE_FILE, BuildSettings, build_settings

_PARSER_HINT = (
    "The node(s) named above use an operator, attribute or type this TensorRT version does not support: "
    "check TensorRT's ONNX operator support list, change the model, or use --backend onnxruntime."
)


def trt_major() -> int:
    return int(trt.__version__.split(".")[0])


def strongly_typed_flag() -> int:
    """Network creation flags: STRONGLY_TYPED where the enum has it (10.x), 0 on 11 (always strong)."""
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


def is_strongly_typed() -> bool:
    return strongly_typed_flag() != 0 or trt_major() >= 11


def _parser_errors(parser: trt.OnnxParser) -> list[str]:
    """One line per parser error, naming the node (older 10.x errors lack node_name: use the index)."""
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        node = err.node()
        name = err.node_name() if hasattr(err, "node_name") else ""
        op = err.node_operator() if hasattr(err, "node_operator") else ""
        where = f"node {node}" + (f" {name!r}" if name else "") + (f" ({op})" if op else "")
        lines.append(f"{where}: {err.desc()}")
    return lines


def _parse(builder: trt.Builder, logger: CapturingLogger, onnx_path: Path,
           segment: str) -> tuple[trt.INetworkDefinition, trt.OnnxParser]:
    """The parsed network, and its parser: keep the parser alive until the engine is built, since the
    network may use weight memory that the parser owns."""
    network = builder.create_network(strongly_typed_flag())
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external weight files (".onnx.data") next to the model.
    if not parser.parse_from_file(str(onnx_path)):
        errors = _parser_errors(parser) or [logger.recent() or "no details given"]
        shown = "; ".join(errors[:5]) + (f"; and {len(errors) - 5} more" if len(errors) > 5 else "")
        raise UserError(f"TensorRT's ONNX parser rejected {segment} ({onnx_path.name}): {shown}.",
                        _PARSER_HINT)
    return network, parser


def _check_inputs(network: trt.INetworkDefinition, settings: BuildSettings, segment: str) -> None:
    want = trt.DataType.HALF if settings.precision == "fp16" else trt.DataType.FLOAT
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = [tensor.shape[d] for d in range(len(tensor.shape))]
        if not dims or any(d < 0 for d in dims[1:]):
            raise UserError(f"Input {tensor.name} of {segment} has shape {dims}: only the first (batch) "
                            "dimension may be dynamic.", "Re-export the model with `dgate-export build`.")
        if tensor.dtype in (trt.DataType.FLOAT, trt.DataType.HALF) and tensor.dtype != want:
            raise UserError(
                f"Input {tensor.name} of {segment} is {tensor.dtype.name}, but the build asked for "
                f"{settings.precision}: TensorRT takes the precision from the graph's own types.",
                "Export the segments at the precision you build (the build step does this for --precision).")


def _check_quantized(network: trt.INetworkDefinition, settings: BuildSettings, segment: str) -> None:
    """int8 builds take QDQ graphs on strongly typed networks (explicit quantization) only."""
    if settings.precision != "int8":
        return
    if not is_strongly_typed():
        raise UserError(f"{segment}: int8 engines are built from QDQ graphs on strongly typed networks, which "
                        f"this TensorRT ({trt.__version__}) does not offer.", INSTALL_HINT)
    quantize = sum(1 for i in range(network.num_layers)
                   if network.get_layer(i).type == trt.LayerType.QUANTIZE)
    if quantize == 0:
        raise UserError(f"{segment} has no QuantizeLinear nodes: TensorRT would build it in float, not int8.",
                        "Build with `dgate-export build --precision int8 --backend tensorrt`, which quantizes the "
                        "graphs (QDQ) before TensorRT sees them.")


def _profile(builder: trt.Builder, network: trt.INetworkDefinition,
             settings: BuildSettings) -> trt.IOptimizationProfile:
    """Batch 1..max for every input, tuned for opt: carries, `index` and `input` alike."""
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = [tensor.shape[d] for d in range(1, len(tensor.shape))]
        if tensor.shape[0] >= 0:  # a static batch (unusual): the profile must match it exactly
            fixed = trt.Dims([tensor.shape[0], *rest])
            profile.set_shape(tensor.name, fixed, fixed, fixed)
            continue
        profile.set_shape(tensor.name, trt.Dims([1, *rest]), trt.Dims([settings.opt_batch, *rest]),
                          trt.Dims([settings.max_batch, *rest]))
    return profile


def _timing_cache_bytes(out_dir: Path, settings: BuildSettings) -> bytes:
    """The cache to start from: the bundle's own (written by the previous segment), else the user's."""
    own = out_dir / TIMING_CACHE_FILE
    if own.is_file():
        return own.read_bytes()
    if settings.timing_cache is not None:
        if not settings.timing_cache.is_file():
            raise UserError(f"The timing cache {settings.timing_cache} does not exist.",
                            "Pass the timing.cache of an earlier TensorRT bundle, or leave --timing-cache out.")
        return settings.timing_cache.read_bytes()
    return b""


def _config(builder: trt.Builder, settings: BuildSettings, out_dir: Path,
            segment: str) -> trt.IBuilderConfig:
    config = builder.create_builder_config()
    if settings.workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    if not settings.tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: parity with ONNX Runtime
    if settings.precision == "fp16" and not is_strongly_typed():
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise UserError("This TensorRT has neither strongly typed networks nor the FP16 flag.", INSTALL_HINT)
        config.set_flag(trt.BuilderFlag.FP16)
    if settings.hardware_compatible:
        if not hasattr(trt, "HardwareCompatibilityLevel"):
            raise UserError("This TensorRT cannot build hardware-compatible engines.",
                            "Leave out --hardware-compatible, or install TensorRT 10 or newer.")
        info = cuda.device_info()
        if int(info["compute_capability"].split(".")[0]) < 8:
            raise UserError(f"--hardware-compatible engines are built on Ampere or newer GPUs; this one is "
                            f"{info['name']} (compute capability {info['compute_capability']}).",
                            "Leave out --hardware-compatible.")
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    cache = config.create_timing_cache(_timing_cache_bytes(out_dir, settings))
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise UserError(f"The timing cache for {segment} was made by another TensorRT version or GPU.",
                        "Leave out --timing-cache (or delete the stale file) and build again.")
    return config


def build_engine(onnx_path: Path, out_dir: Path, options: Mapping[str, Any]) -> dict[str, Any]:
    """Build `out_dir/<segment>.engine` from `onnx_path`; return the manifest's engine entry."""
    settings = build_settings(options)
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    segment = onnx_path.stem
    if not onnx_path.is_file():
        raise UserError(f"{onnx_path} does not exist, so {segment} cannot be built.",
                        "Run the whole build (`dgate-export build`), which exports the graphs first.")
    logger = CapturingLogger()
    builder = trt.Builder(logger)
    network, parser = _parse(builder, logger, onnx_path, segment)
    _check_inputs(network, settings, segment)
    _check_quantized(network, settings, segment)
    config = _config(builder, settings, out_dir, segment)
    if config.add_optimization_profile(_profile(builder, network, settings)) < 0:
        raise UserError(f"TensorRT refused the batch profile 1..{settings.max_batch} "
                        f"(opt {settings.opt_batch}) for {segment}. {logger.recent()}",
                        "Check --max-batch and --opt-batch.")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(
            f"TensorRT could not build an engine for {segment} ({onnx_path.name}). {logger.recent()}",
            "If TensorRT ran out of memory, lower --max-batch or raise --workspace-mb; otherwise its "
            "messages name the layer it could not implement.")
    del parser  # the engine is built: the parser's weights are no longer needed
    data = bytes(memoryview(serialized))
    write_bytes_atomic(out_dir / TIMING_CACHE_FILE, bytes(memoryview(config.get_timing_cache().serialize())))
    engine_file = segment + ENGINE_SUFFIX
    write_bytes_atomic(out_dir / engine_file, data)
    return {
        "file": engine_file,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "max_batch": settings.max_batch,
        "opt_batch": settings.opt_batch,
        "strongly_typed": is_strongly_typed(),
        "precision": settings.precision,
    }


def finish_build(out_dir: Path, options: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's backend_info: what a Runner checks before loading these engines elsewhere."""
    settings = build_settings(options)
    gpu = cuda.device_info()
    cache = Path(out_dir) / TIMING_CACHE_FILE
    return {
        "tensorrt_version": trt.__version__,
        "gpu": {"name": gpu["name"], "compute_capability": gpu["compute_capability"]},
        "cuda_runtime": gpu["cuda_runtime"],
        "cuda_driver": gpu["cuda_driver"],
        "hardware_compatibility": settings.hardware_level,
        "strongly_typed": is_strongly_typed(),
        "tf32": settings.tf32,
        "opt_batch": settings.opt_batch,
        "workspace_mb": settings.workspace_mb,
        "timing_cache": TIMING_CACHE_FILE if cache.is_file() else None,
    }
