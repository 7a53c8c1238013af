"""The compile side (the `[compile]` extra: torch, torchvision, onnx, onnxscript).

Everything that needs torch or onnx lives here: the architecture zoo, splitting a backbone at its
exits, gate heads, the gated model, FLOPs, training, checkpoints, the `gate` and `build` pipelines,
ONNX export, int8 quantization and the parity check against torch. It depends on the runtime side
(`dgate_export.contract`, `manifest`, `runtime`, ...), never the reverse: nothing outside this package
imports it at module level, so `pip install dgate-export` (no torch) runs and benchmarks bundles.
"""
