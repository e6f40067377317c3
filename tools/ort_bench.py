#!/usr/bin/env python3
"""Times an encoder ONNX file in onnxruntime, the reference `clipact bench` is compared with.

Same protocol as `clipact bench`: one f32[1,3,H,W] frame of the same deterministic pixels, 5
warm-up runs, then N timed runs one at a time. onnxruntime runs on its CPU execution provider
with the given intra-op thread count (inter-op 1, sequential execution) and its graph
optimizations at their default, ORT_ENABLE_ALL, so the comparison is against onnxruntime at
its best.

Prints one JSON object: fps, p50_ms, p99_ms, mean_ms, threads, runtime, version, file.

    python3 tools/ort_bench.py models/demo/encoder.onnx --frames 100 --threads 1

Tools only: the product never runs Python (onnxruntime is an independent reference here).
"""

import argparse
import json
import sys
import time


def bench_pixels(n):
    """The pixels `clipact::precision::bench_pixels` feeds the encoder."""
    import numpy as np

    i = np.arange(n, dtype=np.int64)
    return (((i * 7919) % 255).astype(np.float32) / np.float32(63.75) - np.float32(1.9)).astype(np.float32)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="encoder .onnx file")
    parser.add_argument("--frames", type=int, default=100, help="timed frames (after 5 warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads")
    parser.add_argument(
        "--opt",
        choices=["all", "extended", "basic", "none"],
        default="all",
        help="graph optimization level (default: all, onnxruntime's default)",
    )
    args = parser.parse_args()
    if args.frames < 1 or args.threads < 1:
        parser.error("--frames and --threads must be at least 1")

    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError as e:
        sys.exit(f"error: {e}; install with `pip install onnxruntime numpy`")

    levels = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = levels[args.opt]
    try:
        session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        sys.exit(f"error: onnxruntime cannot load {args.model}: {e}")
    inputs = session.get_inputs()
    if len(inputs) != 1:
        sys.exit(f"error: {args.model} has {len(inputs)} inputs, expected 1 (pixels f32[1,3,H,W])")
    shape = inputs[0].shape
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape):
        sys.exit(f"error: input {inputs[0].name} has shape {shape}, expected a static [1,3,H,W]")
    pixels = bench_pixels(int(np.prod(shape))).reshape(shape)
    feed = {inputs[0].name: pixels}

    for _ in range(5):
        session.run(None, feed)
    latencies = []
    start = time.perf_counter()
    for _ in range(args.frames):
        t = time.perf_counter()
        session.run(None, feed)
        latencies.append((time.perf_counter() - t) * 1e3)
    elapsed = time.perf_counter() - start
    latencies.sort()

    def at(p):
        return latencies[round((len(latencies) - 1) * p)]

    print(
        json.dumps(
            {
                "fps": args.frames / elapsed,
                "p50_ms": at(0.5),
                "p99_ms": at(0.99),
                "mean_ms": sum(latencies) / len(latencies),
                "threads": args.threads,
                "frames": args.frames,
                "runtime": "onnxruntime",
                "version": ort.__version__,
                "graph_optimization": args.opt,
                "file": args.model,
            }
        )
    )


if __name__ == "__main__":
    main()
