"""Classify image files with this bundle's model: python predict.py IMAGE [IMAGE ...]

Needs Pillow, numpy and onnxruntime only (not kdedge). Each image is preprocessed as the model was
trained and measured (manifest.json's "preprocessing"); the artifact the bundle recommends for the
CPU runs with the onnxruntime settings tuned where the bundle was built. One line per image: its
path, the predicted label and its softmax probability, tab-separated, 64 images at a time; a file
that cannot be read, or is not the model's size or channels, stops it with one line (exit 1).
"""
import json, sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

bundle, files = Path(__file__).resolve().parent, sys.argv[1:]
if not files:
    sys.exit("usage: python predict.py IMAGE [IMAGE ...]")
manifest = json.loads((bundle / "manifest.json").read_text())
pre = manifest["preprocessing"]  # the input contract the model was trained and measured with
h, w = pre["size"]


def load(path):  # image file -> (C, H, W) float32, or the uint8 pixels for a model that preprocesses in its graph
    try:
        image = ImageOps.exif_transpose(Image.open(path))
    except (OSError, ValueError) as exc:  # missing, unreadable, not an image
        sys.exit(f"{path}: cannot read it as an image ({exc}); expected an image file (PNG, JPEG, ...)")
    if image.mode.startswith("I"):  # 16-bit (or 32-bit) grayscale: its top 8 bits, as kdedge trained on
        pixels = np.asarray(image, np.int64)
        image = Image.fromarray((pixels >> (8 if pixels.max(initial=0) < 65536 else 24)).clip(0, 255).astype(np.uint8))
    image = image.convert(pre["color"] or image.mode)  # color null: your own arrays' channel order, which kdedge was not told
    if len(image.getbands()) != pre["channels"]:
        sys.exit(f"{path}: {len(image.getbands())} channels ({image.mode}); the model takes {pre['channels']}")
    if pre["resize"]:  # shorter side -> s (bilinear), then a center crop to h x w
        s, (iw, ih) = pre["resize"]["shorter_side"], image.size
        size = (s, int(s * ih / iw)) if iw <= ih else (int(s * iw / ih), s)
        image = image.resize(size, Image.Resampling.BILINEAR) if size != image.size else image
        left, top = round((size[0] - w) / 2), round((size[1] - h) / 2)
        image = image.crop((left, top, left + w, top + h))
    if image.size != (w, h):
        sys.exit(f"{path}: {image.size[0]}x{image.size[1]} pixels; the model takes {w}x{h}")
    if pre.get("in_graph"):  # --input-format uint8-*: the model scales and normalizes itself; it takes the pixels in its layout
        pixels = np.asarray(image, np.uint8).reshape(h, w, -1)  # (H, W, C) as decoded
        return pixels if pre["layout"] == "NHWC" else pixels.transpose(2, 0, 1)
    pixels = np.asarray(image, np.float32).reshape(h, w, -1).transpose(2, 0, 1)  # (C, H, W)
    mean, std = (np.array(pre[k], np.float32).reshape(-1, 1, 1) for k in ("mean", "std"))
    return (pixels * pre["scale"] - mean) / std


# The fastest artifact on the CPU, and (when tuned) the fastest settings for it; a bundle benchmarked without ort-cpu: the FP32 file.
rec = manifest["recommended"].get("ort-cpu") or {"artifact": "models/model.onnx"}
options, tuned = ort.SessionOptions(), rec.get("settings")
if tuned:  # measured on the build machine: on another CPU, re-tune (kdedge.bench.tuning.tune_onnx) or keep the defaults
    levels = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
    options.intra_op_num_threads = tuned["intra_op_threads"]
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, levels[tuned["graph_optimization_level"]])
    options.execution_mode = getattr(ort.ExecutionMode, "ORT_" + tuned["execution_mode"].upper())  # ORT_SEQUENTIAL or ORT_PARALLEL
session = ort.InferenceSession(str(bundle / rec["artifact"]), sess_options=options, providers=["CPUExecutionProvider"])
for start in range(0, len(files), 64):  # in batches: thousands of large images need not fit in memory at once
    batch = files[start : start + 64]
    logits = session.run(None, {manifest["input"]["name"]: np.stack([load(f) for f in batch])})[0]  # (n, classes)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    for path, k, prob in zip(batch, logits.argmax(1), p.max(1)):
        print(f"{path}\t{manifest['labels'][k]}\t{prob:.4f}")
