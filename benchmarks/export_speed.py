"""Speed of an exported detector on onnxruntime (CPU) against ``rclip detect`` fp32 (issue 17).

One RN50 RegionCLIP (random weights: speed does not depend on them; no text tower, as the
released ``regionclip_pretrained-*`` files) with the offline R50-FPN RPN (``lvis_866_fpn``,
zero-shot settings: NMS 0.9, 1000 proposals; box deltas zeroed so the proposals are clipped
anchors inside the image, as ``benchmarks/detect_speed.py`` does) is exported once with
``rclip_core.export.export_onnx`` (``--export-dir`` reuses an earlier export), then
``tests/data/sample_img1.jpg`` (1920x1080 -> 1333x750) runs through

- ``rclip detect``'s path (``rclip_core.inference.ZeroShotPipeline``, fp32, the fast path), and
- ``OnnxDetector.run`` (onnxruntime ``CPUExecutionProvider``),

in two modes - 100 given boxes (``--boxes``; the box graph) and RPN proposals - with K = 3
and K = 1203 class embeddings. Decoding and resizing are the same code on both sides and are
left out; times are medians over ``--repeats`` runs after one warm-up, on ``--threads``
threads. The machine may be shared: the load average is printed with the table.

    python benchmarks/export_speed.py                       # export (minutes) + table
    python benchmarks/export_speed.py --export-dir /tmp/rn50-onnx --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="RN50-quickgelu")
    ap.add_argument("--image", default=str(ROOT / "tests" / "data" / "sample_img1.jpg"))
    ap.add_argument("--export-dir", default=None, help="reuse (or create) this export directory")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from rclip_core.data.images import boxes_to_original, load_image
    from rclip_core.export import OnnxDetector, export_onnx
    from rclip_core.inference import DetectOptions, ZeroShotPipeline
    from rclip_core.models.clip import get_architecture
    from rclip_core.models.proposals.boxes import random_boxes
    from rclip_core.models.proposals.offline import build_offline_rpn
    from rclip_core.models.regionclip import RegionCLIP

    torch.manual_seed(args.seed)
    model = RegionCLIP(get_architecture(args.model), with_text=False).eval()
    rpn = build_offline_rpn("lvis_866_fpn", "zero-shot")
    with torch.no_grad():
        rpn.proposal_generator.rpn_head.anchor_deltas.weight.zero_()
        rpn.proposal_generator.rpn_head.anchor_deltas.bias.zero_()
    model.rpn = rpn
    model.info.rpn_kind = "lvis_866_fpn"
    opts = DetectOptions(proposals="rpn")
    tmp = None
    if args.export_dir and (Path(args.export_dir) / "export.json").is_file():
        out, export_s = Path(args.export_dir), float("nan")
    else:
        if args.export_dir:
            out = Path(args.export_dir)
        else:
            tmp = tempfile.TemporaryDirectory()
            out = Path(tmp.name) / "export"
        t0 = time.perf_counter()
        export_onnx(model, out, settings=opts, short_side=opts.short_side, max_size=opts.max_size,
                    source=f"random:{args.model}", sha256="")
        export_s = time.perf_counter() - t0
    onnx_det = OnnxDetector(out, threads=args.threads)
    prep = load_image(args.image)
    arr = onnx_det.prepare(args.image)
    boxes = random_boxes(prep.size, 100, torch.Generator().manual_seed(args.seed + 100))
    given = boxes_to_original(boxes, prep).numpy().astype(np.float64)
    g = torch.Generator().manual_seed(args.seed)
    rows = []
    for mode in ("boxes100", "rpn"):
        for K in (3, 1203):
            emb = torch.randn(K, model.embed_dim, generator=g)
            pipe = ZeroShotPipeline(model, emb, DetectOptions(proposals="rpn"))
            gb = given if mode == "boxes100" else None

            def torch_run(pipe=pipe, gb=gb):
                pipe.run(prep, args.image, gb)

            def onnx_run(emb=emb, gb=gb):
                onnx_det.run(arr, emb.numpy(), gb)

            t = {}
            for name, fn in (("torch", torch_run), ("onnx", onnx_run)):
                fn()
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
                t[name] = statistics.median(times)
            rows.append((mode, K, t["torch"], t["onnx"]))
    load = os.getloadavg()
    print(f"\n{args.model}, {Path(args.image).name} at {prep.size[1]}x{prep.size[0]}, {args.threads} threads, "
          f"median of {args.repeats}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; export {export_s:.0f} s\n")
    print("| mode | K | rclip detect fp32 (s) | onnxruntime CPU (s) | onnx / torch |")
    print("|---|---|---|---|---|")
    for mode, K, tt, to in rows:
        print(f"| {mode} | {K} | {tt:.3f} | {to:.3f} | {to / tt:.2f} |")
    by = {(m, k): (tt, to) for m, k, tt, to in rows}
    for mode in ("boxes100", "rpn"):
        print(f"K=1203 vs K=3 ({mode}): torch +{(by[(mode, 1203)][0] - by[(mode, 3)][0]) * 1000:.0f} ms, "
              f"onnx +{(by[(mode, 1203)][1] - by[(mode, 3)][1]) * 1000:.0f} ms")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
