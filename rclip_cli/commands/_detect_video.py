"""``rclip detect`` on videos: frames through the same runner as images (the text side was
embedded once, before), an annotated video and per-frame COCO-style JSON out, optional
ByteTrack ids (supervision)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from rclip_cli._common import console, progress_bar


def video_inputs(inputs) -> list[str]:
    """The videos among INPUTS (files, or folders holding videos); [] when there are none. Mixing
    videos and images is refused."""
    from rclip_core.errors import InputError
    from rclip_core.video import is_video

    videos, others = [], []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item) if is_video(f))
            (videos.extend(found) if found else others.append(item))
        elif is_video(item):
            videos.append(item)
        else:
            others.append(item)
    if videos and others:
        raise InputError("give either images or videos, not both", f"e.g. {videos[0]} alone")
    return videos


def check_videos(videos, every: int | None, fps: float | None):
    from rclip_core.errors import InputError
    from rclip_core.video import probe_video

    if every is not None and fps is not None:
        raise InputError("give --every or --fps, not both")
    if every is not None and every < 1:
        raise InputError("--every must be >= 1")
    if fps is not None and fps <= 0:
        raise InputError("--fps must be > 0")
    return [probe_video(v) for v in videos]


def detect_videos(runner, vocab, opts, infos, out: Path, draw: bool, every: int | None, fps: float | None,
                  track: bool) -> None:
    """Every video: sampled frames -> ``runner(prepared, name, None)`` -> detections; writes
    OUT/<stem>.mp4 (annotated, unless ``draw`` is False) and OUT/<stem>.json."""
    import numpy as np
    from rich.table import Table

    from rclip_core.data.images import resize_image
    from rclip_core.fileio import atomic_write_json
    from rclip_core.video import VideoWriter, sample_frames
    from rclip_core.viz import draw_detections

    cat_ids = np.asarray(vocab.category_ids, dtype=np.int64)
    categories = [{"id": int(c), "name": n} for c, n in zip(vocab.category_ids, vocab.names)]
    table = Table(title=f"rclip detect: {len(infos)} video(s)")
    for col in ("video", "size", "frames run", "detections", "frames/s", "outputs"):
        table.add_column(col)
    stems: dict[str, int] = {}
    for info in infos:
        stem = Path(info.path).stem
        stems[stem] = stems.get(stem, 0) + 1
        stem = stem if stems[stem] == 1 else f"{stem}_{stems[stem] - 1}"
        tracker = None
        if track:
            from trackers import ByteTrackTracker  # supervision's ByteTrack, moved to `trackers` in 0.30

            tracker = ByteTrackTracker(frame_rate=float(fps or info.fps / (every or 1)))
        out_fps = fps if fps is not None else info.fps / (every or 1)
        writer = VideoWriter(out / f"{stem}.mp4", out_fps, info.width, info.height) if draw else None
        frames, n_dets, t_model = [], 0, 0.0
        t0 = time.perf_counter()
        total = info.frames // (every or 1) if info.frames and fps is None else None
        try:
            with progress_bar(Path(info.path).name, total=total, unit="frames") as advance:
                for index, t, image in sample_frames(info.path, every or 1, fps):
                    t1 = time.perf_counter()
                    res = runner(resize_image(image, opts.short_side, opts.max_size), f"{info.path}#{index}", None)
                    t_model += time.perf_counter() - t1
                    d = res.detections
                    track_ids = None
                    if tracker is not None:
                        tracked = tracker.update(d.to_supervision(list(vocab.names)))
                        boxes, scores = tracked.xyxy, tracked.confidence
                        classes, track_ids = tracked.class_id, tracked.tracker_id
                    else:
                        boxes, scores, classes = d.boxes.numpy(), d.scores.numpy(), d.classes.numpy()
                    dets = []
                    for j in range(len(scores)):
                        x1, y1, x2, y2 = (float(v) for v in boxes[j])
                        row = {"bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                               "score": round(float(scores[j]), 5), "category_id": int(cat_ids[int(classes[j])])}
                        if track_ids is not None:  # -1: not (yet) a confirmed track
                            row["track_id"] = int(track_ids[j]) if int(track_ids[j]) >= 0 else None
                        dets.append(row)
                    n_dets += len(dets)
                    frames.append({"frame": index, "time": round(t, 4), "detections": dets})
                    if writer is not None:
                        labels = [vocab.display_names[int(c)] + (f" #{int(k)}" if track_ids is not None and k >= 0 else "")
                                  for c, k in zip(classes, track_ids if track_ids is not None else classes)]
                        writer.write(draw_detections(image, [list(map(float, b)) for b in boxes][:100], labels[:100],
                                                     [float(s) for s in scores][:100],
                                                     [int(c) for c in classes][:100]))
                    advance(1)
        finally:
            if writer is not None:
                writer.close()
        seconds = time.perf_counter() - t0
        atomic_write_json(out / f"{stem}.json", {
            "video": os.path.abspath(info.path), "width": info.width, "height": info.height, "fps": info.fps,
            "sampling": {"every": every} if fps is None else {"fps": fps}, "tracking": "bytetrack" if track else None,
            "categories": categories, "frames_run": len(frames), "seconds": round(seconds, 3),
            "model_seconds": round(t_model, 3), "frames": frames}, indent=1)
        table.add_row(Path(info.path).name, f"{info.width}x{info.height}", str(len(frames)), str(n_dets),
                      f"{len(frames) / seconds:.1f}" if seconds > 0 else "-",
                      f"{stem}.json" + (f", {stem}.mp4" if draw else ""))
    console.print(table)
    console.print(f"wrote per-frame JSON{' and annotated videos' if draw else ''} to {out}")
