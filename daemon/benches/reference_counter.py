#!/usr/bin/env python3
"""Python reference for the counter-path benchmark (daemon/benches/counter.rs).

Does the same job per frame as rxvisiond's scan, the way a Python service
would: Pillow decode + resize (the bundle's input spec), numpy normalise,
onnxruntime on the same model.onnx, and a durable sqlite3 insert of a record
of the same size. Prints one JSON line: p50/p95 in ms.
"""
import argparse, hashlib, json, os, sqlite3, sys, tempfile, time

import numpy as np
import onnxruntime as ort
from PIL import Image
import io


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    manifest = json.load(open(os.path.join(a.bundle, "manifest.json")))
    spec = manifest["input"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = a.threads
    sess = ort.InferenceSession(os.path.join(a.bundle, manifest["model"]), opts, providers=["CPUExecutionProvider"])
    frame = open(a.image, "rb").read()
    mean = np.asarray(spec["mean"], np.float32).reshape(1, 1, 3)
    std = np.asarray(spec["std"], np.float32).reshape(1, 1, 3)
    db_dir = tempfile.mkdtemp()
    db = sqlite3.connect(os.path.join(db_dir, "audit.sqlite"), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE audit (seq INTEGER PRIMARY KEY, value BLOB)")
    samples = []
    for i in range(a.iters + 20):
        t = time.perf_counter()
        img = Image.open(io.BytesIO(frame)).convert("RGB").resize((spec["width"], spec["height"]), Image.Resampling.BILINEAR)
        x = (np.asarray(img, np.float32) * np.float32(spec["scale"]) - mean) / std
        x = np.ascontiguousarray(x.transpose(2, 0, 1)[None])
        probs = sess.run(None, {spec["name"]: x})[0][0]
        top = np.argsort(-probs)[:3]
        record = json.dumps({"seq": i, "image_sha256": hashlib.sha256(frame).hexdigest(),
                             "top_k": [[int(k), float(probs[k])] for k in top], "verdict": "MATCH"}).encode()
        db.execute("INSERT INTO audit VALUES (?, ?)", (i, record + os.urandom(max(0, 640 - len(record)))))
        if i >= 20:
            samples.append((time.perf_counter() - t) * 1e3)
    samples.sort()
    print(json.dumps({"p50_ms": samples[len(samples) // 2], "p95_ms": samples[int(len(samples) * 0.95)],
                      "onnxruntime": ort.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
