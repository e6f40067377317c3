#!/usr/bin/env python3
"""Check clipact encoder ONNX files against independent references (tests and tools only).

For the f32 file (--model):
  * onnx.checker.check_model(full_check=True): the ONNX spec's own validator, with shape
    inference;
  * onnxruntime with every graph optimization off (TRAPS.md: its optimizer rewrites
    quantized patterns), run on each image of --pixels, compared with --expect (the candle
    outputs) to --atol.

For the int8 file (--int8, optional): the checker, and onnxruntime loads and runs it; the
embedding's cosine similarity to --expect must reach --min-cosine. Its error is NOT compared
elementwise: onnxruntime's u8 x s8 kernels saturate on AVX2 CPUs without VNNI (TRAPS.md), so
it is no int8 reference on such machines.

Inputs are safetensors files: --pixels holds `pixel_values` f32[B,3,H,W]; --expect holds
`embedding` f32[B,D] and `weight_logit` f32[B,1]. Prints one JSON object; exits 1 on any
failure, 2 when a Python module is missing (install with
`python3 -m pip install onnx onnxruntime numpy safetensors`).
"""

import argparse
import json
import sys

try:
    import numpy as np
    import onnx
    import onnxruntime as ort
    from safetensors.numpy import load_file
except ImportError as e:  # pragma: no cover - environment problem, reported clearly
    print(
        f"onnx_check.py: missing Python module ({e}); install with "
        "`python3 -m pip install onnx onnxruntime numpy safetensors`",
        file=sys.stderr,
    )
    sys.exit(2)


def session(path):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def run_all(sess, pixels):
    """Runs a batch-1 model on every image; returns {output name: stacked array}."""
    input_name = sess.get_inputs()[0].name
    names = [o.name for o in sess.get_outputs()]
    outs = {n: [] for n in names}
    for i in range(pixels.shape[0]):
        values = sess.run(names, {input_name: pixels[i : i + 1]})
        for n, v in zip(names, values):
            outs[n].append(v[0])
    return {n: np.stack(v) for n, v in outs.items()}


def cosines(a, b):
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def check(path, report, key):
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    report[key] = {
        "checker": "ok",
        "opset": [(o.domain or "ai.onnx", o.version) for o in model.opset_import],
        "ops": sorted({n.op_type for n in model.graph.node}),
    }
    return report[key]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the f32 encoder.onnx")
    ap.add_argument("--pixels", required=True, help="safetensors with pixel_values f32[B,3,H,W]")
    ap.add_argument("--expect", required=True, help="safetensors with embedding, weight_logit")
    ap.add_argument("--atol", type=float, default=1e-4)
    ap.add_argument("--int8", help="the int8 encoder file (optional)")
    ap.add_argument("--min-cosine", type=float, default=0.99)
    args = ap.parse_args()

    pixels = load_file(args.pixels)["pixel_values"].astype(np.float32)
    expect = load_file(args.expect)
    report = {"onnx": onnx.__version__, "onnxruntime": ort.__version__, "images": int(pixels.shape[0])}
    failures = []

    f32 = check(args.model, report, "f32")
    outs = run_all(session(args.model), pixels)
    for name in ("embedding", "weight_logit"):
        got, want = outs[name], expect[name].reshape(outs[name].shape)
        err = float(np.abs(got - want).max())
        f32[f"{name}_max_abs_err"] = err
        if not err <= args.atol:
            failures.append(f"f32 {name}: onnxruntime vs candle max abs error {err:.3e} > {args.atol:g}")

    if args.int8:
        q = check(args.int8, report, "int8")
        outs = run_all(session(args.int8), pixels)
        cos = cosines(outs["embedding"], expect["embedding"])
        q["embedding_min_cosine"] = float(cos.min())
        q["weight_logit_max_abs_err"] = float(np.abs(outs["weight_logit"] - expect["weight_logit"].reshape(outs["weight_logit"].shape)).max())
        if not cos.min() >= args.min_cosine:
            failures.append(f"int8 embedding: cosine to candle {cos.min():.4f} < {args.min_cosine}")

    report["failures"] = failures
    print(json.dumps(report))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
