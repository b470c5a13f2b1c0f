"""``rclip eval``: COCO / COCO OVD / LVIS / ShapesWorld / custom-data evaluation of zero-shot
RegionCLIP (ground-truth boxes or RPN proposals) or of a fine-tuned detector."""

from __future__ import annotations

import os
from pathlib import Path

import click

from rclip_cli._common import console, device_option, err_console, progress_bar, rclip_command
from rclip_cli._model_options import model_options, resolve_model

# metric key -> plain name; "{n}" is filled with the split's class count
_PLAIN_NAMES = {
    "AP50_novel": "Novel AP50 ({n})",
    "AP50_base": "Base AP50 ({n})",
    "AP50_all": "All AP50 ({n})",
    "AP": "AP, IoU 0.50:0.95",
    "AP50": "AP50, IoU 0.50",
    "AP75": "AP75, IoU 0.75",
    "APs": "AP of small objects",
    "APm": "AP of medium objects",
    "APl": "AP of large objects",
    "APr": "AP of rare classes (novel)",
    "APc": "AP of common classes",
    "APf": "AP of frequent classes",
    "AP_novel": "Novel AP, IoU 0.50:0.95",
    "AP_base": "Base AP, IoU 0.50:0.95",
    "AP_all": "All AP, IoU 0.50:0.95",
    "region_acc": "Region accuracy (GT boxes, top-1)",
    "region_acc_novel": "Novel region accuracy",
    "region_acc_base": "Base region accuracy",
    "classes_under_budget": "Classes with fewer detections than the budget",
}
_ORDER = ("AP50_novel", "AP50_base", "AP50_all", "AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc",
          "APf", "AP_novel", "AP_base", "AP_all", "region_acc", "region_acc_novel", "region_acc_base",
          "segm_AP", "segm_AP50", "segm_AP75", "segm_APs", "segm_APm", "segm_APl", "segm_APr", "segm_APc", "segm_APf")


@rclip_command("eval", short_help="COCO / LVIS evaluation: zero-shot (GT or RPN boxes) or a detector.")
@click.option("--zero-shot", "zero_shot", is_flag=True,
              help="Zero-shot RegionCLIP: classify ground-truth boxes (--boxes gt) or RPN proposals "
                   "(--boxes rpn) against the class names' text embeddings.")
@click.option("--detector", is_flag=True,
              help="Evaluate a fine-tuned detector (weights from `rclip finetune`).")
@click.option("--dataset", metavar="NAME|PATH",
              help="coco-ovd (65 classes, novel/base/all AP50), coco (80), lvis (1203, APr/c/f; val), "
                   "lvis-minival (the 5k minival, from --annotations lvis_v1_minival.json), shapes:DIR "
                   "(a ShapesWorld; novel/base from its split.json), or an instances PATH.json.")
@click.option("--images", metavar="DIR",
              help="Folder with the images (COCO: val2017/; LVIS: val2017/ or the COCO root). "
                   "Default for ShapesWorld: DIR/val.")
@click.option("--annotations", metavar="FILE",
              help="Ground truth for coco-ovd/coco (instances_val2017.json) or lvis (lvis_v1_val.json); "
                   "default IMAGES/../annotations/<that file>.")
@click.option("--novel-classes", metavar="A,B|FILE",
              help="Novel classes (names or ids) of coco, ShapesWorld or custom data: adds novel/base/all "
                   "AP50.")
@click.option("--base-classes", metavar="A,B|FILE",
              help="Base classes (default: every class that is not novel).")
@model_options
@click.option("--class-embeddings", metavar="FILE",
              help="Class embeddings [K, D] in the dataset's category-id order (official "
                   "coco_65_cls_emb.pth, lvis_1203_cls_emb.pth, or `rclip embed` output); default: computed "
                   "with the text tower.")
@click.option("--templates", default="clip81", show_default=True,
              help="Prompt templates when computing class embeddings: clip81, single, or a file.")
@click.option("--average", type=click.Choice(["raw", "normalized"]), default="raw", show_default=True,
              help="Template averaging (raw = the official released files).")
@click.option("--boxes", type=click.Choice(["gt", "rpn"]), default=None,
              help="Zero-shot regions [gt]: gt = ground-truth boxes, crowd excluded (official GT "
                   "mode); rpn = offline RPN proposals (the official zero-shot configs).")
@click.option("--score-thresh", type=float, default=None,
              help="Keep (box, class) pairs scoring above this [COCO 0.001; LVIS 0.02 RPN / 0.0001 GT].")
@click.option("--nms", "nms", type=float, default=None, help="Per-class NMS IoU threshold [0.5].")
@click.option("--max-dets", type=int, default=None, help="Detections kept per image [COCO 100, LVIS 300].")
@click.option("--fusion", type=click.Choice(["official", "sigmoid", "none"]), default=None,
              help="RPN score fusion [official = sqrt(prob x raw logit), as the released code; sigmoid = the "
                   "paper's geometric mean; none]. RPN boxes only.")
@click.option("--topk-labels", type=int, default=0, show_default=True,
              help="Best K classes per box that may become detections (0 = all pairs, the official "
                   "protocol).")
@click.option("--soft-nms/--hard-nms", "soft_nms", default=None,
              help="Detector only: gaussian soft-NMS (the official test script) or hard NMS [as stored "
                   "in the file].")
@click.option("--rpn-nms", type=float, default=None, help="RPN NMS threshold [zero-shot 0.9; detector 0.7].")
@click.option("--rpn-topk", type=int, default=None, help="RPN proposals per image [1000].")
@click.option("--short-side", type=int, default=800, show_default=True, help="Test resize: shortest side.")
@click.option("--max-size", type=int, default=1333, show_default=True,
              help="Test resize: longest side at most.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="bf16 autocast is faster; fp32 reproduces the official numbers.")
@click.option("--batch-size", type=int, default=4, show_default=True,
              help="Images per model call (same-size images share one trunk pass; results do not change).")
@click.option("--workers", type=int, default=2, show_default=True,
              help="DataLoader processes decoding images while the model runs (0 = none).")
@click.option("--max-images", type=int, default=None, help="Evaluate only the first N images (quick checks).")
@click.option("--backend", type=click.Choice(["faster", "pycocotools", "lvis"]), default="faster",
              show_default=True,
              help="AP implementation: faster-coco-eval (COCO and LVIS), pycocotools (COCO), lvis (LVIS).")
@click.option("--protocol", type=click.Choice(["standard", "fixed-ap"]), default="standard", show_default=True,
              help="standard = COCO 100 / LVIS 300 detections per image; fixed-ap = LVIS Fixed AP (Dave et al. "
                   "2021: top 10,000 detections per class over the split, no per-image cap; GLIP, YOLO-World, "
                   "MM-Grounding-DINO on minival). With fixed-ap, --max-dets defaults to 1000 per image.")
@click.option("--json", "json_path", metavar="FILE",
              help="Write the report (metrics, coverage, model, dataset, split, settings, file hashes).")
@click.option("--save-predictions", metavar="FILE",
              help="Write the detections in COCO results format (image_id, category_id, bbox [x, y, w, h], "
                   "score; + segmentation RLE for a detector with a mask head).")
@device_option
def eval_cmd(zero_shot, detector, dataset, images, annotations, novel_classes, base_classes,
             class_embeddings, templates, average, boxes, score_thresh, nms, max_dets, fusion,
             topk_labels, soft_nms, rpn_nms, rpn_topk, short_side, max_size, precision, batch_size, workers,
             max_images, backend, protocol, json_path, save_predictions, device, debug, **kw):
    """Evaluate open-vocabulary detection on COCO, COCO OVD, LVIS, ShapesWorld or your COCO-format data.

    Zero-shot settings follow the official configs (CLIP_fast_rcnn_R_50_C4_zsinf.yaml, Table 4)
    for the data set and box mode, detector settings the transfer-learning ones
    (test_transfer_learning.sh); every one can be overridden.
    Prints a table of metrics; --json writes them with the model, data set, split, settings and
    file hashes, and names the protocol, split and detection budget beside every number;
    --save-predictions writes the detections. A detector with a mask head also gets mask AP
    (segm_AP, segm_APr, ...) when the ground truth has segmentations.
    Images missing on disk are counted, and the metrics state how many images they cover.

    \b
    Examples:
      rclip eval --zero-shot --boxes gt --dataset coco-ovd --images coco/val2017 \\
          --weights regionclip_pretrained-cc_rn50.pth --class-embeddings coco_65_cls_emb.pth
      rclip eval --zero-shot --boxes rpn --dataset lvis --images coco/ \\
          --weights regionclip_pretrained-cc_rn50x4.pth --json lvis_rpn.json
      rclip eval --zero-shot --dataset shapes:world --weights student.safetensors --json r.json
      rclip eval --zero-shot --dataset mydata/val.json --images mydata/images \\
          --novel-classes "zebra,kite" --weights W.pth --save-predictions preds.json
      rclip eval --detector --dataset coco-ovd --images coco/val2017 \\
          --weights regionclip_finetuned-coco_rn50.pth --rpn-weights rpn_coco_48.pth
      rclip eval --detector --dataset lvis-minival --images coco/ --protocol fixed-ap \\
          --annotations lvis_v1_minival.json --weights regionclip_finetuned-lvis_rn50.pth \\
          --rpn-weights rpn_lvis_866_lsj.pth --json minival_fixed_ap.json
    """
    from rclip_core.device import resolve_device
    from rclip_core.errors import InputError
    from rclip_core.data.datasets import resolve_dataset
    from rclip_core.evaluation.protocol import run_evaluation

    if zero_shot == detector:
        raise InputError("choose what to evaluate: --zero-shot or --detector",
                         hint="e.g. rclip eval --zero-shot --boxes gt --dataset coco-ovd "
                              "--images val2017/ ...")
    for name, value, low in (("--batch-size", batch_size, 1), ("--workers", workers, 0),
                             ("--max-images", max_images, 1), ("--short-side", short_side, 1),
                             ("--max-size", max_size, 1), ("--rpn-topk", rpn_topk, 1)):
        if value is not None and value < low:
            raise InputError(f"{name} must be >= {low}, got {value}")
    if max_size < short_side:
        raise InputError(f"--max-size {max_size} is smaller than --short-side {short_side}")
    if rpn_nms is not None and not 0.0 < rpn_nms <= 1.0:
        raise InputError(f"--rpn-nms {rpn_nms} must be in (0, 1]")
    if detector:
        _check_detector_flags(kw, boxes, topk_labels, precision)
    else:
        boxes = boxes or "gt"
        if boxes == "gt":
            for name, value in (("--fusion", fusion), ("--rpn-nms", rpn_nms), ("--rpn-topk", rpn_topk)):
                if value is not None:
                    raise InputError(f"{name} applies to --boxes rpn only (ground-truth boxes have no "
                                     "objectness)")
        if soft_nms is not None:
            raise InputError("--soft-nms applies to --detector (zero-shot uses hard per-class NMS, as the official zero-shot configs)")
    outputs = [(o, p) for o, p in (("--json", json_path), ("--save-predictions", save_predictions)) if p]
    for opt, p in outputs:
        _check_output_file(p, opt)
    if json_path and save_predictions and Path(json_path).resolve() == Path(save_predictions).resolve():
        raise InputError("--json and --save-predictions name the same file")

    data = resolve_dataset(dataset, images, annotations, novel_classes, base_classes)
    from rclip_core.evaluation.protocol import describe_protocol

    protocol_info = describe_protocol(protocol, data.kind)  # fixed-ap on COCO data fails here, before the model
    if protocol == "fixed-ap" and max_dets is None:
        max_dets = 1000  # a per-image cap of 300 would leave most classes short of the 10,000 budget
    if backend == "pycocotools" and data.kind == "lvis":
        raise InputError("the pycocotools backend cannot evaluate LVIS (federated rules differ)",
                         hint="use --backend faster or --backend lvis")
    if backend == "lvis" and data.kind != "lvis":
        raise InputError(f"the lvis backend evaluates LVIS only, and {data.name} is COCO-format",
                         hint="use --backend faster or --backend pycocotools")
    dev = resolve_device(device)
    overrides = {"score_thresh": score_thresh, "nms": nms, "max_dets": max_dets,
                 "fusion": fusion}
    common = {"protocol": protocol_info["name"], "protocol_text": protocol_info["text"],
              "per_class_budget": protocol_info["per_class"], "backend": backend, "batch_size": batch_size, "workers": workers, "max_images": max_images,
              "class_embeddings": str(class_embeddings) if class_embeddings else
              f"text tower, {templates} templates, {average} average", "device": str(dev),
              "short_side": short_side, "max_size": max_size}
    if detector:
        predict, model, settings = _detector_setup(kw, data, dev, overrides, soft_nms, rpn_nms, rpn_topk,
                                                   class_embeddings, templates, average)
        mode = "detector"
    else:
        predict, model, settings = _zero_shot_setup(kw, data, dev, boxes, overrides, topk_labels, rpn_nms,
                                                    rpn_topk, short_side, max_size, precision,
                                                    class_embeddings, templates, average)
        mode = f"zero-shot/{boxes}"
    settings = {**common, **settings, "eval_max_dets": protocol_info["per_image"]}
    _print_header(data, model, settings, mode, max_images)

    n_images = min(len(data.present), max_images) if max_images else len(data.present)
    with progress_bar("eval", total=n_images, unit="img") as advance:
        scored = [0]

        def advance_metrics(n: int) -> None:  # one live display at a time: report AP progress on the same bar
            scored[0] += n
            advance(0, extra=f"AP: {scored[0]}/{len(data.vocabulary)} classes")

        result = run_evaluation(data, predict, gt_boxes=mode == "zero-shot/gt", short_side=short_side,
                                max_size=max_size, backend=backend, batch_size=batch_size, workers=workers,
                                max_images=max_images, protocol=protocol, progress=advance,
                                metrics_progress=advance_metrics)

    _print_table(result, data, mode)
    for note in result.notes:
        err_console.print(f"[bold yellow]note:[/] {note}", highlight=False)
    if result.failed:
        from rich.markup import escape

        err_console.print(f"[bold yellow]warning:[/] {len(result.failed)} image(s) could not be evaluated "
                          "and are left out of the metrics:")
        for p, reason in result.failed[:10]:
            err_console.print(f"  [yellow]{escape(p)}[/]: {escape(reason)}", soft_wrap=True, highlight=False)
        if len(result.failed) > 10:
            err_console.print(f"  ... and {len(result.failed) - 10} more")

    if save_predictions:
        from rclip_core.evaluation.results import write_results

        write_results(save_predictions, result.detections, segmentations=result.segmentations)
        console.print(f"wrote {save_predictions} ({len(result.detections)} detections, COCO results format"
                      + (", with mask RLEs)" if result.segmentations is not None else ")"))
    if json_path:
        from rclip_core.evaluation.results import make_report
        from rclip_core.fileio import atomic_write_json

        report = make_report(result, data, mode=mode, model=_model_info(model, kw), settings=settings,
                             files=_file_hashes(data, kw, class_embeddings))
        atomic_write_json(json_path, report, indent=1)
        console.print(f"wrote {json_path}")


def _zero_shot_setup(kw, data, dev, boxes, overrides, topk_labels, rpn_nms, rpn_topk, short_side, max_size,
                     precision, class_embeddings, templates, average):
    """Model, class embeddings and pipeline for zero-shot evaluation (the official zsinf defaults)."""
    from rclip_core.evaluation.protocol import zero_shot_predictor
    from rclip_core.evaluation.zeroshot import dataset_class_embeddings, default_options
    from rclip_core.inference import ZeroShotPipeline

    opts = default_options(data.kind, boxes)
    for attr, value in overrides.items():
        if value is not None:
            setattr(opts, attr, value)
    opts.topk_labels, opts.short_side, opts.max_size = topk_labels, short_side, max_size
    opts.precision = precision
    opts.validate()
    model = resolve_model(kw, dev)
    if boxes == "rpn" and model.rpn is not None and (rpn_nms is not None or rpn_topk is not None):
        from dataclasses import replace

        s = model.rpn.settings
        model.rpn.settings = replace(s, nms=rpn_nms if rpn_nms is not None else s.nms,
                                     post_nms_topk=rpn_topk if rpn_topk is not None else s.post_nms_topk)
    class_emb = dataset_class_embeddings(model, data.vocabulary, class_embeddings, templates, average,
                                         trust=bool(kw.get("trust_weights")))
    pipe = ZeroShotPipeline(model, class_emb, opts)
    rpn = None
    if boxes == "rpn":
        s = model.rpn.settings
        rpn = {"kind": model.info.rpn_kind, "nms_thresh": s.nms, "post_nms_topk": s.post_nms_topk,
               "pre_nms_topk": s.pre_nms_topk, "min_box_size": s.min_box_size}
    settings = {"boxes": boxes, "crowd_boxes": "excluded" if boxes == "gt" else None,
                "score_thresh": opts.score_thresh, "nms_thresh": opts.nms, "max_dets": opts.max_dets,
                "fusion": opts.fusion if boxes == "rpn" else "none", "topk_labels": opts.topk_labels,
                "rpn": rpn, "precision": opts.precision}
    return zero_shot_predictor(pipe), model, settings


def _check_detector_flags(kw, boxes, topk_labels, precision) -> None:
    from rclip_core.errors import InputError

    if not kw.get("weights"):
        raise InputError("--detector needs --weights DETECTOR",
                         hint="a file written by `rclip finetune`, or an official regionclip_finetuned-*.pth")
    for name, value in (("--model", kw.get("model_name")), ("--random-init", kw.get("random_init")),
                        ("--pretrained", kw.get("pretrained")), ("--boxes", boxes),
                        ("--topk-labels", topk_labels or None),
                        ("--precision bf16", precision == "bf16" or None)):
        if value:
            raise InputError(f"{name} applies to --zero-shot only (a detector makes its own proposals and "
                             "runs in fp32)")


def _detector_setup(kw, data, dev, overrides, soft_nms, rpn_nms, rpn_topk, class_embeddings, templates,
                    average):
    """A fine-tuned detector (rclip_core.models.detector) with the dataset's classes. Score
    threshold and detections per image default to the benchmark's (the transfer configs: COCO
    0.001 / 100, LVIS 0.02 / 300); NMS, soft-NMS and RPN-score fusion to what the detector file
    stores."""
    from rclip_core.errors import InputError
    from rclip_core.data.vocab import same_class_names
    from rclip_core.evaluation.protocol import detector_predictor
    from rclip_core.evaluation.zeroshot import dataset_class_embeddings

    from rclip_core.weights.loaders import load_detector

    lvis = data.kind == "lvis"
    # the official protocol whatever the file stores: every (box, class) pair may become a
    # detection (fast_rcnn.py: fast_rcnn_inference_single_image), the benchmark's threshold / top-k
    changes = {"score_thresh": 0.02 if lvis else 0.001, "max_dets": 300 if lvis else 100, "topk_labels": 0}
    changes.update({k: v for k, v in overrides.items() if v is not None})
    if soft_nms is not None:
        changes["soft_nms"] = soft_nms
    det = load_detector(kw["weights"], device=dev, trust=bool(kw.get("trust_weights")))
    det.update_inference(**changes)
    if kw.get("rpn_weights"):
        from rclip_core.weights.loaders import load_rpn_file

        if det.proposal_generator is not None:
            raise InputError("--rpn-weights: this detector trained its own RPN")
        load_rpn_file(det.regionclip, kw["rpn_weights"], trust=bool(kw.get("trust_weights")))
        det.set_test_proposals()  # the transfer settings (NMS 0.7, 1000 proposals: CLIP_fast_rcnn_R_50_C4_ovd.yaml)
    if rpn_nms is not None or rpn_topk is not None:
        det.set_test_proposals(post_nms_topk=rpn_topk, nms=rpn_nms)
    if det.proposal_generator is None and det.regionclip.rpn is None:
        raise InputError("the detector has no proposal source: these weights carry no offline RPN",
                         hint="pass --rpn-weights (rpn_coco_48.pth for COCO, rpn_lvis_866_lsj.pth for LVIS)")
    vocab = data.vocabulary
    same = det.class_names is not None and same_class_names(det.class_names, vocab.names)
    if class_embeddings or not same:
        if not class_embeddings and not det.regionclip.has_text:
            raise InputError(f"the detector's classes ({len(det.class_names or [])}) are not the dataset's "
                             f"{len(vocab)} and it has no text encoder to embed them",
                             hint="pass --class-embeddings FILE with the dataset's classes in category-id "
                                  "order")
        emb = dataset_class_embeddings(det.regionclip, vocab, class_embeddings, templates, average,
                                       trust=bool(kw.get("trust_weights")))
        det.set_vocabulary(list(vocab.names), emb)
    s = det.inference_config
    rpn = None
    if det.proposal_generator is None:
        r = det.regionclip.rpn.settings
        rpn = {"kind": det.regionclip.info.rpn_kind, "nms_thresh": r.nms,
               "post_nms_topk": r.post_nms_topk, "pre_nms_topk": r.pre_nms_topk,
               "min_box_size": r.min_box_size}
    settings = {"boxes": "detector", "proposals": det.config.proposals, "score_thresh": s.score_thresh,
                "nms_thresh": s.nms, "soft_nms": s.soft_nms, "max_dets": s.max_dets,
                "fusion": s.fusion, "topk_labels": s.topk_labels, "rpn": rpn, "precision": "fp32",
                **({"class_embeddings": "the detector file's"} if (same and not class_embeddings) else {})}
    return detector_predictor(det), det.regionclip, settings


# --------------------------------------------------------------------------------------------


def _check_output_file(path: str, option: str) -> None:
    """Refuse, before any work, an output file that cannot be written (the file itself is
    written atomically at the end, and its folder created only then)."""
    from rclip_core.errors import InputError

    p = Path(path).expanduser()
    if p.is_dir():
        raise InputError(f"{option} {p} is a directory, expected a file name")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not _can_create_in(parent):
        raise InputError(f"cannot write {option} {p}: {parent} is not a writable folder")


def _can_create_in(folder: Path) -> bool:
    """Whether a file can be made in ``folder`` (tried: ``os.access`` says yes to root everywhere)."""
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=".rclip-probe-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def _print_header(data, model, s: dict, mode: str, max_images) -> None:
    splits = ""
    if data.splits:
        splits = " (" + ", ".join(f"{len(v)} {k}" for k, v in data.splits.items()) + ")"
    console.print(f"[bold]dataset[/]  {data.name}: {data.description}; {data.num_images} images, "
                  f"{len(data.vocabulary)} classes{splits}; {data.annotations}", soft_wrap=True)
    console.print(f"[bold]model[/]    {model.arch.name} from {model.info.source}"
                  + (f", RPN {s['rpn']['kind']}" if s["rpn"] else ""), soft_wrap=True)
    rpn = f"(NMS {s['rpn']['nms_thresh']:g}, {s['rpn']['post_nms_topk']} per image)" if s["rpn"] else ""
    if mode == "detector":
        what = f"detector | {'offline RPN ' + rpn if s['rpn'] else 'trained RPN'}"
        nms = ("soft-NMS" if s["soft_nms"] else "per-class NMS") + f" {s['nms_thresh']:g}"
    else:
        what = "zero-shot | " + ("GT boxes (crowd excluded)" if s["boxes"] == "gt" else
                                 f"RPN proposals {rpn}")
        nms = f"per-class NMS {s['nms_thresh']:g}"
    pairs = "all (box, class) pairs" if not s["topk_labels"] else f"top-{s['topk_labels']} classes per box"
    console.print(f"[bold]settings[/] {what} | score > {s['score_thresh']:g} | {nms} | {s['max_dets']} "
                  f"detections/image | fusion {s['fusion']} | {pairs} | resize "
                  f"{s['short_side']}/{s['max_size']} | {s['precision']} | {s['backend']} backend",
                  soft_wrap=True, markup=True)
    console.print(f"[bold]protocol[/] {s['protocol_text']}", soft_wrap=True, highlight=False)
    n = len(data.present)
    if data.missing:
        err_console.print(f"[bold yellow]warning:[/] {len(data.missing)} of the {data.num_images} images are "
                          f"not in {data.images_dir} (e.g. {data.missing[0]['file_name']}); the "
                          f"metrics cover the {n} present", soft_wrap=True, highlight=False)
    if max_images and max_images < n:
        err_console.print(f"[bold yellow]note:[/] --max-images {max_images}: evaluating the first "
                          f"{max_images} of {n} images", highlight=False)


def _fmt(key: str, v: float) -> str:
    import math

    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100 * v:.1f} %" if key.startswith("region_acc") else f"{v:.2f}"


def _print_table(result, data, mode: str) -> None:
    from rich.table import Table

    sizes = {k: len(v) for k, v in (data.splits or {}).items()}
    if data.splits and "all" not in sizes:
        sizes["all"] = len(set().union(*data.splits.values()))
    what = {"zero-shot/gt": "zero-shot, GT boxes", "zero-shot/rpn": "zero-shot, RPN boxes"}.get(mode, mode)
    table = Table(title=f"rclip eval: {what}, {data.name} ({result.coverage} images), {result.protocol['name']}",
                  caption="AP on a 0-100 scale (segm_ = mask AP); n/a = no ground truth; "
                          + result.protocol["text"], min_width=72)
    table.add_column("metric")
    table.add_column("key", style="dim")
    table.add_column("value", justify="right")
    keys = [k for k in _ORDER if k in result.metrics] + sorted(k for k in result.metrics if k not in _ORDER)
    for k in keys:
        mask, base = k.startswith("segm_"), k[len("segm_"):] if k.startswith("segm_") else k
        split = base.split("_", 1)[1] if "_" in base and not base.startswith("region_acc_") else \
            (base[len("region_acc_"):] if base.startswith("region_acc_") else "")
        n = sizes.get(split)
        name = ("Mask " if mask else "") + _PLAIN_NAMES.get(base, base).format(
            n="?" if n is None else f"{n} class{'es' if n != 1 else ''}")
        table.add_row(name, k, _fmt(k, result.metrics[k]))
    console.print(table)
    parts = [f"{len(result.missing)} missing on disk"] if result.missing else []
    if result.failed:
        parts.append(f"{len(result.failed)} failed")
    console.print(f"metrics cover {result.coverage} images" + (f" ({', '.join(parts)})" if parts else "")
                  + f"; {len(result.detections)} detections; {result.seconds_inference:.1f} s inference, "
                    f"{len(result.image_ids) / max(result.seconds_inference, 1e-9):.2f} img/s")


def _model_info(model, kw: dict) -> dict:
    return {"source": model.info.source, "format": model.info.source_format,
            "architecture": model.arch.name, "embed_dim": model.embed_dim,
            "rpn": model.info.rpn_kind if model.rpn is not None else None,
            "random_init": model.info.source_format == "random", "weights": kw.get("weights"),
            "model": kw.get("model_name"), "pretrained": kw.get("pretrained"),
            "rpn_weights": kw.get("rpn_weights")}


def _file_hashes(data, kw: dict, class_embeddings) -> dict:
    from rclip_core.fileio import sha256_file

    files = {"annotations": data.annotations, "weights": kw.get("weights"),
             "rpn_weights": kw.get("rpn_weights"), "class_embeddings": class_embeddings}
    return {k: (sha256_file(v) if v else None) for k, v in files.items()}
