"""The classifier's `pneumonode` subcommands: stats, train, predict, cam, localise.

`register(subparsers)` adds them to the CLI's argparse subparsers; each handler takes the
parsed arguments and returns an exit code (0 ok, 1 some inputs failed, 2 usage/data error).
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from ai.analysis.methods import METHOD_NAMES

log = logging.getLogger(__name__)

DEVICE_HELP = "cpu, cuda, cuda:N or auto (GPU when present; default auto)"


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)


def _add_method(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--method",
        default=None,
        choices=METHOD_NAMES,
        help="default: the model's own (segmentation with a mask head, else gradcam)",
    )


def _console(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run a handler with library warnings sent to the log (see `ai.cli.console`)."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        from ai.cli.console import route_library_warnings

        route_library_warnings()
        return handler(args)

    return run


def register(subparsers, parents: list[argparse.ArgumentParser] | None = None) -> None:
    """Add the classifier's subcommands to an argparse `add_subparsers()` object.

    `parents` are the CLI's shared option parsers (--config, --log-level), so every
    subcommand accepts them.
    """
    parents = parents or []
    from ai.train.recipes import DEFAULT_RECIPE, RECIPES

    sample = subparsers.add_parser(
        "sample-data",
        parents=parents,
        help="fetch the sample chest X-rays (fastai's SIIM_SMALL) into a folder",
        description="Download fastai's SIIM_SMALL (250 chest X-ray DICOMs and labels.csv) "
        "into DIR, or take it from --source: an http(s) URL, a local .tgz/.zip, or a folder "
        "in the same layout (its train-rle.csv(.gz) masks are copied too). DIR then holds "
        "labels.csv and train/<label>/*.dcm, which storescu, stats and train read. A DIR that "
        "already holds the data is left as it is.",
    )
    sample.add_argument("folder", metavar="DIR", help="where to put the data")
    sample.add_argument(
        "--source", default=None,
        help="URL, archive or folder to take the data from (default: fastai's SIIM_SMALL URL)",
    )
    sample.set_defaults(func=_console(run_sample_data))

    stats = subparsers.add_parser(
        "stats",
        parents=parents,
        help="cohort table (all tags + pixel statistics) and plots",
        description="One row per DICOM file (every top-level tag plus img_min, img_max, "
        "img_mean, img_std, img_pct_window) as CSV (and Parquet with the 'parquet' extra: "
        "pip install -e '.[parquet]'), plus age, sex, view position and label plots.",
    )
    stats.add_argument("sources", nargs="+", help="DICOM files or folders (searched for *.dcm)")
    stats.add_argument("--out", required=True, help="folder for cohort.csv and the PNGs")
    stats.add_argument("--workers", type=int, default=0, help="parallel readers (default 0)")
    stats.set_defaults(func=_console(run_stats))

    train = subparsers.add_parser(
        "train",
        parents=parents,
        help="cross-validate a recipe, train the classifier and write the model artifact",
        description="Cross-validate the recipe (stratified k-fold grouped by PatientID), "
        "choose the decision threshold on the out-of-fold predictions (unless --threshold), "
        "fit it on all the data and write model.safetensors, model.json and reports/ into "
        "--out; the figures reported are the cross-validated ones. --nested adds a nested "
        "cross-validation of refit vs fold ensemble and of the threshold. Options override "
        "the chosen --recipe.",
    )
    train.add_argument(
        "--data",
        default=None,
        help="folder with labels.csv or the Kaggle SIIM layout (train-rle.csv); "
        "default: download fastai's SIIM_SMALL",
    )
    train.add_argument("--out", required=True, help="model directory to write")
    train.add_argument(
        "--recipe",
        default=DEFAULT_RECIPE,
        choices=sorted(RECIPES),
        help=f"named training recipe (default {DEFAULT_RECIPE}: the best measured by "
        "cross-validation; seed: the source's recipe)",
    )
    train.add_argument(
        "--arch",
        default=None,
        help="xresnet18/34/50/101/152, or resnet18/34/50, densenet121 (torchvision)",
    )
    train.add_argument(
        "--act", default=None, choices=["mish", "relu", "silu"], help="activation function"
    )
    train.add_argument(
        "--self-attention",
        dest="sa",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="self-attention layer",
    )
    train.add_argument("--widen", type=float, default=None, help="width multiplier")
    train.add_argument("--size", type=int, default=None, help="input size in pixels")
    train.add_argument("--epochs", type=int, default=None)
    train.add_argument("--lr", type=float, default=None, help="learning rate")
    train.add_argument("--batch-size", type=int, default=None)
    train.add_argument("--seed", type=int, default=None, help="seed of the split and the init")
    train.add_argument(
        "--name",
        default=None,
        help="the model's name in model.json, the results' captions and the SR's algorithm "
        "name (default: pneumonode pneumothorax RECIPE ARCH)",
    )
    train.add_argument(
        "--folds", type=int, default=None, help="cross-validation folds (default 5; >= 2)"
    )
    train.add_argument("--mixup", type=float, default=None, help="MixUp alpha (0 = off)")
    train.add_argument(
        "--tta",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="predict on the image and its mirror image and average (also in the node)",
    )
    train.add_argument(
        "--init-weights",
        default=None,
        help="start from this state dict: a pneumonode model, an xresnet state dict, or "
        "torchvision/timm ResNet/DenseNet weights for --arch resnet18/34/50, densenet121",
    )
    train.add_argument(
        "--cache-dir",
        default=None,
        help="decoded-image cache folder (default ~/.cache/pneumonode/decoded)",
    )
    train.add_argument(
        "--workers", type=int, default=None, help="processes that fill the image cache"
    )
    train.add_argument("--optimizer", default=None, choices=["ranger", "adam"])
    train.add_argument("--loss", default=None, choices=["label_smoothing", "cross_entropy"])
    train.add_argument("--schedule", default=None, choices=["flat_cos", "one_cycle"])
    train.add_argument(
        "--lr-find",
        dest="lr_find",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="run lr_find first and train at the rate it suggests (its valley)",
    )
    train.add_argument(
        "--augment",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="fastai aug_transforms during training",
    )
    train.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="fixed probability threshold for the positive label; default: chosen on the "
        "pooled out-of-fold predictions (Youden's J: max sensitivity + specificity - 1, "
        "halfway between the neighbouring probabilities, ties to the highest), stored in "
        "model.json; sensitivity/specificity at a threshold chosen on those same "
        "predictions are optimistic (--nested measures them honestly)",
    )
    train.add_argument(
        "--nested",
        action="store_true",
        help="also run nested cross-validation: per outer fold, compare the refit model "
        "(trained on the other folds) with the mean of inner-fold models (ensemble), and "
        "score the threshold rule chosen on inner out-of-fold predictions only; writes "
        "reports/nested.json and nested_predictions.csv (default inner folds: the other "
        "outer folds, 10 extra fits for 5 folds)",
    )
    train.add_argument(
        "--inner-folds",
        type=int,
        default=None,
        help="inner folds of --nested (default folds - 1: the other outer folds; another "
        "number re-splits each outer-training set and trains folds x inner-folds models)",
    )
    train.add_argument(
        "--max-items",
        type=int,
        default=None,
        help="use at most this many files (balanced by label)",
    )
    _add_device(train)
    train.set_defaults(func=_console(run_train))

    predict = subparsers.add_parser(
        "predict",
        parents=parents,
        help="probability of pneumothorax for DICOM files",
        description="Batched inference; prints file, SOP Instance UID, probability (4 "
        "decimals), the model's decision threshold, label (the positive class at or above "
        "the threshold) and, for a file that cannot be read, the error. The CSV has the same "
        "columns with the probability and threshold at full precision.",
    )
    predict.add_argument("model", help="model directory (model.json + model.safetensors)")
    predict.add_argument("files", nargs="+", help="DICOM files")
    predict.add_argument(
        "--csv", default=None, help="also write the table to this CSV file (full precision)"
    )
    predict.add_argument("--batch-size", type=int, default=32)
    predict.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="auto: bf16 autocast on a GPU, fp32 on the CPU",
    )
    _add_device(predict)
    predict.set_defaults(func=_console(run_predict))

    cam = subparsers.add_parser(
        "cam",
        parents=parents,
        help="heatmap picture (CAM or GradCAM) for DICOM files",
        description="Writes the X-ray and the X-ray with the map (magma, alpha 0.6) side by "
        "side, titled with the probability, the model's threshold and the label; prints each "
        "picture's path with the same. With several files --out is a folder (<name>_cam.png "
        "each).",
    )
    cam.add_argument("model", help="model directory")
    cam.add_argument("files", nargs="+", help="DICOM files")
    _add_method(cam)
    cam.add_argument(
        "--target", default=None, help="class name to explain (default: the model's positive class)"
    )
    cam.add_argument(
        "--layer",
        default=None,
        help="GradCAM layer by module name, e.g. 7 or 7.2 (default: last stage)",
    )
    cam.add_argument("--out", default="cam.png", help="PNG file, or folder for several files")
    _add_device(cam)
    cam.set_defaults(func=_console(run_cam))

    localise = subparsers.add_parser(
        "localise",
        parents=parents,
        help="check heatmaps against the SIIM pneumothorax masks",
        description="For positive images with masks in train-rle.csv(.gz): share of GradCAM "
        "peaks inside the mask and share of map energy inside it.",
    )
    localise.add_argument("model", help="model directory")
    localise.add_argument(
        "--data", required=True, help="folder with labels.csv / DICOMs and train-rle.csv(.gz)"
    )
    localise.add_argument(
        "--scope",
        default="validation",
        choices=["validation", "all"],
        help="positive images of the model's validation split, or all",
    )
    _add_method(localise)
    localise.add_argument(
        "--out",
        default=None,
        help="folder for localisation-<scope>.json/.csv (default: <model>/reports; train's "
        "own localisation.csv there is never replaced)",
    )
    localise.add_argument("--batch-size", type=int, default=8)
    _add_device(localise)
    localise.set_defaults(func=_console(run_localise))


def run_sample_data(args: argparse.Namespace) -> int:
    from ai.data.sample_data import SampleDataError, fetch_sample_data

    try:
        fetched = fetch_sample_data(args.folder, args.source)
    except SampleDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(fetched.summary())
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from ai.data.stats import write_cohort_report

    try:
        written = write_cohort_report(args.sources, args.out, n_workers=args.workers)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written.tables + written.plots:
        print(path)
    for note in written.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def run_train(args: argparse.Namespace) -> int:
    from ai.train.recipes import get_recipe
    from ai.train.workflow import train

    if args.inner_folds is not None and not args.nested:
        print("error: --inner-folds needs --nested", file=sys.stderr)
        return 2
    config = get_recipe(args.recipe).with_overrides(
        arch_name=args.arch,
        arch_act=args.act,
        arch_sa=args.sa,
        arch_widen=args.widen,
        size=args.size,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        folds=args.folds,
        mixup=args.mixup,
        tta=args.tta,
        optimizer=args.optimizer,
        loss=args.loss,
        schedule=args.schedule,
        lr_find=args.lr_find,
        augment=args.augment,
        threshold=args.threshold,
        threshold_rule=None if args.threshold is None else "fixed",
        max_items=args.max_items,
    )
    try:
        result = train(config, args.data, args.out, device=args.device,
                       cache_dir=args.cache_dir, init_weights=args.init_weights,
                       workers=args.workers, nested=args.nested, inner_folds=args.inner_folds,
                       model_name=args.name)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    metrics = result.metrics
    print(f"model: {result.model_dir}")
    print(f"evaluation: {metrics['evaluation']} (mean over folds, 95 % interval)")
    for key, value in metrics["figures"].items():
        print(f"{key}: {value['mean']:.3f} [{value['low']:.3f}, {value['high']:.3f}]")
    pooled = metrics["pooled_out_of_fold"]["roc_auc"]
    if pooled["auc"] is not None:
        print(f"pooled out-of-fold roc_auc: {pooled['auc']:.3f} "
              f"[{pooled['low']:.3f}, {pooled['high']:.3f}]")
    choice = metrics["threshold_choice"]
    rates = ", ".join(f"{name} {choice[name]:.3f}" for name in ("sensitivity", "specificity")
                      if choice[name] is not None)
    print(f"decision threshold: {choice['threshold']:.4f} ({choice['rule']}; pooled "
          f"out-of-fold {rates}" + (", optimistic" if choice["rule"] != "fixed" else "") + ")")
    if result.nested is not None:
        from ai.train.nested import table_lines

        print("\n".join(table_lines(result.nested)))
    return 0


def _read_inputs(files: list[str]):
    """(path, dataset, grey8) for readable files, and (path, message) for the others."""
    from ai.data.preprocess import UnsupportedImageError, read_dataset, read_grey8

    good, bad = [], []
    for name in files:
        try:
            ds = read_dataset(name)
            good.append((name, ds, read_grey8(ds)))
        except UnsupportedImageError as exc:
            bad.append((name, str(exc)))
    return good, bad


def _load_analyzer(args: argparse.Namespace, batch_size: int, precision: str = "auto"):
    """The Analyzer for args.model, or None after printing why the model was refused."""
    from ai.analysis.infer import Analyzer
    from ai.model.artifact import ArtifactError

    try:
        return Analyzer(args.model, device=args.device, batch_size=batch_size, precision=precision)
    except ArtifactError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


PREDICT_COLUMNS = ["file", "sop_instance_uid", "probability", "threshold", "label", "error"]
_NUMBER_COLUMNS = ["probability", "threshold"]


def _four_decimals(value: float) -> str:
    return "" if value != value else f"{value:.4f}"  # NaN: no probability


def _console_table(table) -> str:
    """The table for a person: text left-aligned, probability and threshold to 4 decimals."""
    formatters = dict.fromkeys(_NUMBER_COLUMNS, _four_decimals)
    for column in table.columns.drop(_NUMBER_COLUMNS):
        width = max([len(column), *(len(str(v)) for v in table[column])])
        formatters[column] = lambda value, width=width: f"{value:<{width}}"
    return table.to_string(index=False, justify="left", na_rep="", formatters=formatters)


def _without_prefix(message: str, name: str) -> str:
    """An input error names its file first; the table has the file in its own column."""
    return message.removeprefix(f"{name}: ")


def run_predict(args: argparse.Namespace) -> int:
    import pandas as pd

    from ai.cli.console import progress

    analyzer = _load_analyzer(args, args.batch_size, args.precision)
    if analyzer is None:
        return 2
    rows: dict[str, dict] = {}
    starts = range(0, len(args.files), args.batch_size)
    for start in progress(starts, desc="predict", unit="batch") if len(starts) > 1 else starts:
        names = args.files[start : start + args.batch_size]
        good, bad = _read_inputs(names)
        probabilities = analyzer.predict([image for _, _, image in good]) if good else []
        for (name, ds, _), probability in zip(good, probabilities, strict=True):
            rows[name] = {
                "file": name,
                "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
                "probability": float(probability),
                "threshold": float(analyzer.threshold),
                "label": analyzer.label_for(probability),
                "error": "",
            }
        for name, message in bad:
            rows[name] = {
                "file": name,
                "sop_instance_uid": "",
                "probability": float("nan"),
                "threshold": float("nan"),
                "label": "",
                "error": _without_prefix(message, name),
            }
    table = pd.DataFrame(
        [rows[name] for name in dict.fromkeys(args.files)], columns=PREDICT_COLUMNS
    )
    shown = table if table["error"].any() else table.drop(columns="error")
    print(_console_table(shown))
    if args.csv:
        table.to_csv(args.csv, index=False)  # every digit: repr of the float64
    return 1 if table["error"].any() else 0


def _cam_result(analyzer, prediction) -> str:
    """One image's result as `cam` titles and prints it: the probability beside the threshold,
    and the label with its side of the threshold, so a negative is not read as positive."""
    from ai.results.sc.picture import decision_text

    probability, threshold = prediction.probability, analyzer.threshold
    return (
        f"P({analyzer.loaded.positive_class}) = {probability:.4f} (threshold {threshold:.4f}) "
        f"-> {prediction.label} ({decision_text(probability, threshold)}); "
        f"{prediction.method_title} for {prediction.target_class}"
    )


def run_cam(args: argparse.Namespace) -> int:
    from ai.analysis.display import save_cam_figure

    analyzer = _load_analyzer(args, batch_size=8)
    if analyzer is None:
        return 2
    good, bad = _read_inputs(args.files)
    for name, message in bad:
        print(f"error: {name}: {message}", file=sys.stderr)
    if not good:
        return 2 if bad else 0
    try:
        predictions = analyzer.explain(
            [image for _, _, image in good],
            target=args.target,
            layer=args.layer,
            method=args.method,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from ai.cli.console import progress

    out = Path(args.out)
    pairs = list(zip(good, predictions, strict=True))
    for (name, _ds, image), prediction in progress(pairs, desc="cam") if len(pairs) > 1 else pairs:
        target = out if len(args.files) == 1 else out / f"{Path(name).stem}_cam.png"
        result = _cam_result(analyzer, prediction)
        save_cam_figure(target, image, prediction.heatmap, f"{Path(name).name}: {result}")
        print(f"{target}: {result}")
    return 1 if bad else 0


def run_localise(args: argparse.Namespace) -> int:
    from ai.model.artifact import ArtifactError
    from ai.train.localise import localise, output_files

    out = args.out or str(Path(args.model) / "reports")
    try:
        summary = localise(
            args.model,
            args.data,
            out,
            scope=args.scope,
            method=args.method,
            batch_size=args.batch_size,
            device=args.device,
        )
    except (ArtifactError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for key, value in summary.items():
        print(f"{key}: {value}")
    print("written: " + ", ".join(map(str, output_files(out, args.scope))))
    return 0
