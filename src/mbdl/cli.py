"""The ``mbdl`` command line: ``train``, ``eval``, ``embed``, ``search``, ``verify``, ``index``,
``export``, ``data``, ``compare``.

User errors (a bad config key or value, a missing file, a refused checkpoint) print one line,
``mbdl: error: ...``, on stderr and exit with code 2, without a traceback (set ``MBDL_DEBUG=1``
to see one). A diverged run exits with code 1, an interrupted one with 130.

Subcommands live in a registry: add one with :func:`command` (a function that configures its
``argparse`` parser and a function that runs it and returns the exit code).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import mbdl
from mbdl.errors import (
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    UserError,
    one_line,
    terminal_safe,
)

if TYPE_CHECKING:
    from mbdl.model.record import VerificationRecord

#: exceptions reported as one line with exit code 2 (UserError is a ValueError)
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, MemoryError)
_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*=")


class UsageError(UserError):
    """A command-line usage error (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line: ``mbdl: error: ...``."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see: {self.prog} --help)")


@dataclass
class Command:
    """A subcommand: ``configure(parser)`` adds its arguments, ``run(args)`` returns the exit code."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def command(
    name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Register ``mbdl <name>``: decorate the function that runs it."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = Command(name, help, configure, run)
        return run

    return register


def split_overrides(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``key=value`` overrides from other arguments (paths)."""
    overrides = [item for item in items if _OVERRIDE.match(item)]
    others = [item for item in items if not _OVERRIDE.match(item)]
    return overrides, others


def _print_metrics(metrics: dict[str, Any], file: Any = None) -> None:
    from mbdl.runconfig import format_metrics

    print(format_metrics(metrics), file=file or sys.stdout)


# ---------------------------------------------------------------------------------------------
# mbdl train


def _add_config_items(parser: argparse.ArgumentParser, help: str) -> None:
    """The ``[CONFIG] [KEY=VALUE ...]`` positional arguments of ``train`` and ``scan``."""
    parser.add_argument("items", nargs="*", metavar="[CONFIG] [KEY=VALUE ...]", help=help)


def _configure_train(parser: argparse.ArgumentParser) -> None:
    _add_config_items(
        parser,
        "a YAML config file (default: MDL on glyphs) and dotted overrides, e.g. "
        "loss.name=triplet loss.margin=0.1 train.epochs=5",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )


@command(
    "train", "train, select on validation classes, test once, write the report", _configure_train
)
def _run_train(args: argparse.Namespace) -> int:
    from mbdl.config import config_to_yaml, load_config
    from mbdl.train import train

    overrides, others = split_overrides(args.items)
    if len(others) > 1:
        raise UsageError(f"expected at most one config file, got {', '.join(others)}")
    config = load_config(others[0] if others else None, overrides)
    if args.print_config:
        from mbdl.recipe import resolve_auto

        try:  # model.backbone=auto: scans the data to show what will run
            resolve_auto(config)
        except FileNotFoundError as error:  # no data there (yet): the config as given
            print(
                f"# model.backbone=auto is chosen when the data can be read: {terminal_safe(error)}"
            )
        if config.recipe is not None:
            print(f"# {terminal_safe(config.recipe.describe())}")
        print(config_to_yaml(config), end="")
        return 0
    from mbdl.distributed import distributed_info

    main_rank = distributed_info().is_main  # under torchrun only rank 0 prints
    try:
        metrics = train(config)
    except KeyboardInterrupt:
        saved = Path(str(config.out)) / "config.yaml"
        hint = f"; continue with: mbdl train {saved} resume=true" if saved.is_file() else ""
        if main_rank:
            print(f"mbdl: interrupted{hint}", file=sys.stderr)
        return 130
    if not main_rank:
        return 0
    print(f"run directory: {config.out}")
    stopped = metrics.get("stopped")
    if stopped:
        print(f"stopped at epoch {stopped['epoch']}, step {stopped['step']} by {stopped['by']}")
    meta = metrics.get("meta") or {}
    if metrics.get("validation"):
        print(f"validation ({config.train.select_metric} selected):")
        _print_metrics({**metrics["validation"], **meta.get("validation", {})})
    print("test:")
    _print_metrics({**metrics["test"], **meta.get("test", {})})
    report = Path(str(config.out)) / "report.html"
    if report.is_file():
        print(f"report: {report}")
    return 0


# ---------------------------------------------------------------------------------------------
# loading a checkpoint's data


def _checkpoint_config(checkpoint: str, overrides: list[str]) -> tuple[Any, dict[str, Any]]:
    """The config stored in a checkpoint, with ``data.*`` / ``eval.*`` overrides applied."""
    from mbdl.model.loading import load_state, state_record
    from mbdl.runconfig import model_config

    state = load_state(checkpoint)
    return model_config(state_record(state, checkpoint), overrides), state


def _split_dataset(splits: Any, name: str) -> Any:
    """The split ``name`` with the evaluation transform (:func:`mbdl.runconfig.split_for_inference`)."""
    from mbdl.runconfig import split_for_inference

    return split_for_inference(splits, name)


def _add_checkpoint_args(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "checkpoint",
        metavar=what,
        help="a run directory, a checkpoint .pt file or a model directory",
    )
    parser.add_argument(
        "items",
        nargs="*",
        metavar="KEY=VALUE",
        help="data.* / eval.* overrides of the checkpoint's config, e.g. data.root=/data/CUB_200_2011",
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def _device(name: str) -> Any:
    from mbdl.runconfig import resolve_device

    return resolve_device(name)


def _checkpoint_model(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """``(config, device, model)`` for a command taking ``CHECKPOINT [data/eval overrides]``."""
    from mbdl.model.checkpoint import model_from_state

    overrides, others = split_overrides(args.items)
    if others:
        raise UsageError(f"unexpected argument {others[0]!r} (overrides look like key=value)")
    config, state = _checkpoint_config(args.checkpoint, overrides)
    device = _device(args.device)
    return config, device, model_from_state(state, device)


# ---------------------------------------------------------------------------------------------
# mbdl eval


def _configure_eval(parser: argparse.ArgumentParser) -> None:
    _add_checkpoint_args(parser, "RUN_DIR_OR_CHECKPOINT")
    parser.add_argument(
        "--split", default="test", choices=("test", "val"), help="which classes (default: test)"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help='print {"metrics": ..., "meta": ...} as JSON (the run metadata apart: k-means '
        "backend, restarts, seed, pair counts)",
    )
    parser.add_argument("-o", "--output", metavar="FILE", help="also write that JSON to FILE")


def _overrides_only(items: Sequence[str]) -> list[str]:
    overrides, others = split_overrides(items)
    if others:
        raise UsageError(f"unexpected argument {others[0]!r} (overrides look like key=value)")
    return overrides


@command("eval", "evaluate a trained model on the test (or validation) classes", _configure_eval)
def _run_eval(args: argparse.Namespace) -> int:
    from mbdl.fileio import atomic_write_text
    from mbdl.inference import evaluate_model

    result = evaluate_model(
        args.checkpoint,
        split=args.split,
        overrides=_overrides_only(args.items),
        device=args.device,
    )
    document = result.to_json()
    if args.output:
        atomic_write_text(args.output, json.dumps(document, indent=2) + "\n")
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        _print_metrics({**result.metrics, **result.meta})
    return 0


# ---------------------------------------------------------------------------------------------
# mbdl embed

_SPLITS = ("train", "val", "test", "query", "gallery")


def _configure_embed(parser: argparse.ArgumentParser) -> None:
    _add_checkpoint_args(parser, "CHECKPOINT")
    parser.add_argument("--split", default="test", choices=_SPLITS, help="default: test")
    parser.add_argument(
        "--images",
        metavar="DIR",
        help="embed every image below DIR instead of a split (labels from first-level "
        "subfolders, -1 for images directly in DIR); needs -o X.npy",
    )
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="FILE.npy|FILE.npz",
        help="X.npy: streamed float32 embeddings with X.labels.npy, X.paths.txt and X.json "
        "(memory-mappable; runs under torchrun, each rank a shard); X.npz: one file in memory",
    )
    parser.add_argument("--batch-size", type=int, help="default: the config's eval.batch_size")
    parser.add_argument(
        "--workers", type=int, help="image loading processes (default: the config's, else 0)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


@command(
    "embed",
    "write the embeddings of a split or an image folder (.npy streamed, or .npz)",
    _configure_embed,
)
def _run_embed(args: argparse.Namespace) -> int:
    overrides, others = split_overrides(args.items)
    if others:
        raise UsageError(f"unexpected argument {others[0]!r} (overrides look like key=value)")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    if args.output.endswith(".npy"):
        return _embed_streaming(args, overrides)
    if args.images is not None:
        raise UsageError("--images writes a streamed .npy: give -o FILE.npy")
    if not args.output.endswith(".npz"):
        raise UsageError(f"-o must end in .npy or .npz, got {args.output!r}")
    return _embed_npz(args)


def _embed_npz(args: argparse.Namespace) -> int:
    import numpy as np

    from mbdl.fileio import atomic_write_bytes
    from mbdl.inference import embed

    result = embed(
        args.checkpoint,
        split=args.split,
        overrides=_overrides_only(args.items),
        device=args.device,
    )
    buffer = io.BytesIO()
    np.savez(
        buffer,
        embeddings=result.embeddings.numpy(),
        labels=result.labels.numpy(),
        class_names=np.array(result.class_names, dtype=str),
        items=np.array(result.items, dtype=str),
    )
    atomic_write_bytes(args.output, buffer.getvalue())
    print(
        f"wrote {len(result.items)} embeddings of dimension {result.embeddings.shape[1]} "
        f"({args.split} split) to {args.output}"
    )
    return 0


def _embed_streaming(args: argparse.Namespace, overrides: list[str]) -> int:
    """``mbdl embed ... -o X.npy``: stream into memory-mapped files; one shard per torchrun rank."""
    import torch

    from mbdl.data.workers import loader_workers
    from mbdl.distributed import init_distributed
    from mbdl.embedstore import FolderImages, embed_to_files, model_dim, output_paths
    from mbdl.inference import as_loaded_model
    from mbdl.model.loading import model_from_loaded_state

    output_paths(args.output)  # checks the name before any work
    device = _device(args.device)
    info = init_distributed(device.type)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    try:
        if args.images is not None:
            if overrides:
                raise UsageError(f"{overrides[0]!r}: overrides do not apply with --images")
            loaded = as_loaded_model(args.checkpoint, device)
            dataset = FolderImages(args.images, dict(loaded.record.preprocessing))
            example = dataset.normalised(0)
            batch_size, workers = args.batch_size or 256, args.workers or 0
            class_names, what = dataset.class_names, f"images below {args.images}"
        else:
            config, state = _checkpoint_config(args.checkpoint, overrides)
            loaded = model_from_loaded_state(state, device, args.checkpoint)
            dataset = _split_dataset(_load_data_once(config), args.split)
            batch_size = args.batch_size or config.eval.batch_size
            workers = (
                loader_workers(config.data.num_workers, dataset, training=False)
                if args.workers is None
                else args.workers
            )
            class_names, what = list(dataset.class_names), f"{args.split} split"
            example = dataset[0][0]
        model = loaded.module
        files = embed_to_files(
            model,
            dataset,
            args.output,
            dim=model_dim(model, example.to(device)),
            batch_size=batch_size,
            device=device,
            num_workers=workers,
            progress=not args.no_progress,
            info={
                "source": what,
                "model": str(args.checkpoint),
                "distance": loaded.record.distance,
                "class_names": class_names,
                "preprocessing": dict(loaded.record.preprocessing),
            },
        )
    finally:
        if info.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if info.is_main:
        print(
            f"wrote {len(dataset)} embeddings ({what}) to {files['embeddings']} with "
            f"{files['labels'].name}, {files['paths'].name}, {files['info'].name}"
        )
    return 0


def _load_data_once(config: Any) -> Any:
    """The config's splits; under torchrun rank 0 first (it may build a cache), then the rest."""
    from mbdl.distributed import barrier, distributed_info
    from mbdl.runconfig import load_data

    main_rank = distributed_info().is_main
    if not main_rank:
        barrier()
    splits = load_data(config)
    if main_rank:
        barrier()
    return splits


# ---------------------------------------------------------------------------------------------
# mbdl search


def _configure_search(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        metavar="INDEX|CHECKPOINT",
        help="a catalog index (mbdl index build), or a run directory, .pt file or model "
        "directory whose data split is searched",
    )
    parser.add_argument(
        "items",
        nargs="*",
        metavar="[KEY=VALUE ...] QUERY",
        help="the query image files (with a CHECKPOINT: data.* / eval.* overrides first)",
    )
    parser.add_argument("--images", metavar="DIR", help="query every image below DIR")
    parser.add_argument("--list", metavar="FILE", help="query the images listed in FILE")
    parser.add_argument(
        "--gallery-split",
        "--gallery",
        default="test",
        choices=_SPLITS,
        help="with a CHECKPOINT: the split searched (default: test)",
    )
    parser.add_argument("-k", type=int, default=5, help="neighbours per query (default: 5)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--index",
        metavar="INDEX",
        help="search this index instead of embedding a split; CHECKPOINT must be the model "
        "the index was built with",
    )
    parser.add_argument(
        "--model",
        metavar="MODEL",
        help="with an INDEX: the model embedding the queries (default: the one that built it)",
    )
    parser.add_argument(
        "--threshold",
        nargs="?",
        const="checkpoint",
        metavar="DISTANCE",
        help="mark the neighbours within this distance as matches; without a value: the "
        "verification threshold mbdl train chose on the validation classes",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--engine",
        metavar="ENGINE:LOCATION",
        help="with an INDEX: search the copy exported by mbdl index export (qdrant:DIR, "
        "qdrant:URL, milvus:FILE.db, milvus:URL) instead of the index's own faiss index",
    )
    parser.add_argument(
        "--collection", default="mbdl", help="with --engine: the collection (default: mbdl)"
    )


def _is_catalog(path: str | None) -> bool:
    from mbdl.catalog.store import MANIFEST

    return path is not None and (Path(path) / MANIFEST).is_file()


def _search_catalog(args: argparse.Namespace, index: str, model: str | None) -> int:
    """``mbdl search INDEX QUERY... [--images DIR] [--list FILE]``: a table or JSON."""
    from mbdl.catalog import Searcher
    from mbdl.catalog.search import query_files

    overrides, queries = split_overrides(args.items)
    if overrides:
        raise UsageError(f"{overrides[0]!r}: overrides do not apply to an index search")
    if args.k < 1:
        raise UsageError(f"-k must be at least 1, got {args.k}")
    paths = query_files(queries, args.images, args.list)
    threshold: float | str | None = None
    if args.threshold == "checkpoint":
        threshold = "model"
    elif args.threshold is not None:
        threshold = _distance_threshold(args.threshold, "--threshold")
    searcher = Searcher.open(index, model=model, device=str(_device(args.device)))
    if args.engine is not None:
        from mbdl.catalog.engines import search_engine

        if threshold == "model":
            threshold = searcher.threshold
        results = search_engine(
            args.engine,
            args.collection,
            searcher.embed(paths),
            args.k,
            threshold=threshold if isinstance(threshold, float) else None,
            names=[str(path) for path in paths],
        )
    else:
        results = searcher.search(paths, k=args.k, threshold=threshold)
    if args.json:
        print(json.dumps([result.to_json() for result in results], indent=1))
        return 0
    for result in results:
        print(f"query {terminal_safe(result.query)}")
        for n in result.neighbours:
            mark = "" if n.match is None else ("  match" if n.match else "       ")
            label = terminal_safe(repr(n.label)) if n.label is not None else "-"
            print(f"  {n.rank:>3}  {n.distance:.4f}{mark}  {label:<12}  {terminal_safe(n.path)}")
    return 0


@command("search", "find the nearest gallery images of query images", _configure_search)
def _run_search(args: argparse.Namespace) -> int:
    from mbdl.fileio import check_not_mid_replacement
    from mbdl.inference import search_split

    for given in (args.checkpoint, args.index):  # a catalog caught between its two renames
        if given is not None:
            check_not_mid_replacement(Path(given))
    if _is_catalog(args.checkpoint):
        if args.index is not None:
            raise UsageError("give the index once: mbdl search INDEX QUERY...")
        return _search_catalog(args, args.checkpoint, args.model)
    if _is_catalog(args.index):
        return _search_catalog(args, args.index, args.model or args.checkpoint)
    if (Path(args.checkpoint) / "meta.json").is_file():
        raise UsageError(
            f"{args.checkpoint} is an index in mbdl's old format: search it with mbdl search "
            "CHECKPOINT --index INDEX IMAGE, or rebuild it with mbdl index build MODEL --images DIR"
        )
    if args.images or args.list or args.json or args.model:
        raise UsageError(
            "--images, --list, --json and --model need a catalog index (mbdl index build "
            "MODEL --images DIR -o INDEX): mbdl search INDEX QUERY..."
        )
    overrides, images = split_overrides(args.items)
    if not images:
        raise UsageError("give at least one query IMAGE")
    if args.k < 1:
        raise UsageError(f"-k must be at least 1, got {args.k}")
    threshold: float | str | None = None
    if args.threshold == "checkpoint":
        threshold = "model"
    elif args.threshold is not None:
        threshold = _distance_threshold(args.threshold, "--threshold")
    if args.index is not None:
        return _search_index(args, images, overrides, threshold)
    result = search_split(
        args.checkpoint,
        images,
        split=args.gallery_split,
        k=args.k,
        overrides=overrides,
        threshold=threshold,
        device=_device(args.device),
    )
    for query, neighbours in zip(result.queries, result.neighbours, strict=True):
        print(f"query {terminal_safe(query)}")
        for n in neighbours:
            mark = "" if n.match is None else ("  match" if n.match else "       ")
            print(
                f"  {n.rank:>3}  {n.distance:.4f}{mark}  {terminal_safe(repr(n.label)):<12}  "
                f"{terminal_safe(n.item)}"
            )
    return 0


def _match_threshold(
    value: str | None, verification: VerificationRecord | None, distance: str
) -> float | None:
    """The ``--threshold`` of search: a number, or (``"checkpoint"``) the model's validated one
    (:attr:`mbdl.model.ModelRecord.verification`) in ``distance``."""
    if value is None:
        return None
    if value == "checkpoint":
        if verification is None:
            raise UsageError(
                "this checkpoint has no verification threshold (it had no validation classes, "
                "or was trained before mbdl stored one): give one with --threshold DISTANCE"
            )
        return verification.threshold_for(distance)
    return _distance_threshold(value, "--threshold")


def _distance_threshold(value: object, what: str) -> float:
    """``value`` as a distance threshold: a finite number >= 0 (a distance is never negative)."""
    shown = terminal_safe(repr(value)[:80])
    try:
        threshold = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UsageError(f"{what} must be a number; got {shown}") from None
    if not math.isfinite(threshold) or threshold < 0:
        raise UsageError(f"{what} must be a finite distance >= 0; got {shown}")
    return threshold


def _match_mark(distance: float, threshold: float | None) -> str:
    if threshold is None:
        return ""
    return "  match" if distance <= threshold else "       "


def _search_index(
    args: argparse.Namespace,
    images: list[str],
    overrides: list[str],
    threshold: float | str | None,
) -> int:
    """``mbdl search --index INDEX CHECKPOINT IMAGE...``: embed the queries, search the index."""
    import torch

    from mbdl.data import build_transforms
    from mbdl.index import GalleryIndex, model_fingerprint
    from mbdl.inference import read_images
    from mbdl.model.loading import load_model

    if overrides:
        raise UsageError(
            f"{overrides[0]!r}: overrides do not apply with --index (the index is the gallery)"
        )
    index = GalleryIndex.load(args.index)
    loaded = load_model(args.checkpoint, _device(args.device))
    record = loaded.record
    queries = read_images(loaded, images)  # in the model's colour mode, by the checked reader
    distance = "cosine" if index.distance == "cosine" else "euclidean"
    if threshold == "model":
        threshold = _match_threshold("checkpoint", record.verification, distance)
    model_id = model_fingerprint(loaded.module.state_dict())
    if model_id != index.model_id:
        raise ValueError(
            f"checkpoint {args.checkpoint} (model {model_id}) is not the model index {args.index} "
            f"was built with ({index.model_id}); use that checkpoint or rebuild the index"
        )
    transform = build_transforms(
        False,
        int(index.info.get("image_size", record.data_args.get("image_size", 32))),
        int(index.info.get("channels", record.data_args.get("channels", 3))),
        imagenet_norm=bool(index.info.get("imagenet_norm", False)),
    )
    with torch.inference_mode():
        batch = torch.stack([transform(image) for image in queries]).to(loaded.device)
        query_embeddings = loaded.module(batch).float().cpu()
    distances, indices = index.search(query_embeddings, min(args.k, len(index)), model_id=model_id)
    limit = threshold if isinstance(threshold, float) else None
    for path, row_values, row_indices in zip(images, distances, indices, strict=True):
        print(f"query {terminal_safe(path)}")
        for rank, (distance_value, item) in enumerate(
            zip(row_values.tolist(), row_indices.tolist(), strict=True), start=1
        ):
            if item < 0:  # an approximate index found fewer than k items
                break
            label = int(index.labels[item])
            name = index.class_names[label] if label < len(index.class_names) else str(label)
            where = index.paths[item] if item < len(index.paths) else f"#{item}"
            mark = _match_mark(distance_value, limit)
            print(
                f"  {rank:>3}  {distance_value:.4f}{mark}  {terminal_safe(repr(name)):<12}  "
                f"{terminal_safe(where)}"
            )
    return 0


# ---------------------------------------------------------------------------------------------
# mbdl verify


def _configure_verify(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="RUN", help="a run directory or a .pt file")
    parser.add_argument("first", metavar="IMAGE_A", help="an image file")
    parser.add_argument("second", metavar="IMAGE_B", help="another image file")
    parser.add_argument(
        "--threshold",
        metavar="DISTANCE",
        help="decide with this distance threshold instead of the one mbdl train chose on the "
        "validation classes",
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--json", action="store_true", help="print the answer as JSON")


@command(
    "verify",
    "are two images the same item? the distance against the validated threshold",
    _configure_verify,
)
def _run_verify(args: argparse.Namespace) -> int:
    from mbdl.inference import verify

    threshold = None
    if args.threshold is not None:
        try:
            threshold = float(args.threshold)
        except ValueError:
            raise UsageError(f"--threshold must be a number; got {args.threshold!r}") from None
        if not math.isfinite(threshold):
            raise UsageError(f"--threshold must be finite; got {args.threshold!r}")
    answer = verify(
        args.checkpoint, args.first, args.second, threshold=threshold, device=args.device
    )
    if args.json:
        print(json.dumps(answer.to_json(), indent=2))
        return 0
    verdict = "same" if answer.same else "different"
    where = (
        "given with --threshold"
        if answer.threshold_source == "given"
        else f"chosen on the validation classes at FAR {answer.far if answer.far is not None else float('nan'):g}"
    )
    print(
        f"{verdict}: {answer.distance_kind} distance {answer.distance:.4f} "
        f"{'<=' if answer.same else '>'} threshold {answer.threshold:.4f} ({where})"
    )
    return 0


# ---------------------------------------------------------------------------------------------
# mbdl index (implementation: mbdl.catalog; the --split form: mbdl.index)

#: ``mbdl index ACTION``: the handlers; another module may register more (e.g. ``export``)
INDEX_ACTIONS: dict[str, Callable[[argparse.Namespace], int]] = {}


def _configure_index(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        choices=(
            "build",
            "add",
            "remove",
            *sorted(set(INDEX_ACTIONS) - {"build", "add", "remove"}),
        ),
        help="build: index a folder, a list of files, mbdl embed output or a split; "
        "add: index new and changed files; remove: drop items",
    )
    parser.add_argument(
        "checkpoint",
        metavar="MODEL|INDEX",
        help="build: the model (model directory, run directory or checkpoint); add, remove: "
        "the index directory",
    )
    parser.add_argument(
        "items",
        nargs="*",
        metavar="KEY=VALUE|PATH",
        help="build --split: data.* / eval.* overrides; remove: the files (or folders) to drop",
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--images", metavar="DIR", help="index every file below DIR (recursive)")
    parser.add_argument("--list", metavar="FILE", help="index the files listed in FILE")
    parser.add_argument(
        "--embeddings", metavar="X.npy", help="index the output of mbdl embed ... -o X.npy"
    )
    parser.add_argument(
        "--labels",
        default="none",
        metavar="none|folders|CSV",
        help="item labels: none (default), the first-level sub-folder, or a path,label CSV",
    )
    parser.add_argument(
        "--factory",
        metavar="STRING",
        help="a faiss index_factory string (Flat, HNSW32, IVF4096,PQ32, IVF1024,SQ8, ...); "
        "default: picked from the catalog's size and dimension, and printed",
    )
    parser.add_argument(
        "--on-bad",
        default="skip",
        choices=("skip", "refuse"),
        help="unreadable or non-image files: skip and list them (default), or refuse the build",
    )
    parser.add_argument("--model", metavar="MODEL", help="add: the model (default: the index's)")
    parser.add_argument("--missing", action="store_true", help="remove: files that are gone")
    parser.add_argument("--batch-size", type=int, default=256, help="default: 256")
    parser.add_argument("--workers", type=int, default=0, help="image loading processes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing index")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--split", choices=_SPLITS, help="index a split of the model's data")
    parser.add_argument(
        "--kind",
        choices=("flat", "ivf", "hnsw"),
        help="shorthand for --factory: flat (Flat), ivf (IVF{nlist},Flat), hnsw (HNSW{m})",
    )
    parser.add_argument("--nlist", type=int, help="ivf lists (default: 4 sqrt(N))")
    parser.add_argument("--nprobe", type=int, help="ivf lists visited (--split; default: 16)")
    parser.add_argument("--hnsw-m", type=int, help="hnsw neighbours (default: 32)")
    parser.add_argument("-o", "--output", metavar="INDEX", help="build: the index to write")
    parser.add_argument(
        "--to", metavar="ENGINE:LOCATION", help="export: qdrant:DIR|URL or milvus:FILE.db|URL"
    )
    parser.add_argument("--collection", default="mbdl", help="export: default mbdl")
    parser.add_argument("--replace", action="store_true", help="export: replace the collection")


def _check_index_aliases(args: argparse.Namespace) -> None:
    """--nlist, --nprobe, --hnsw-m: in range before any work (faiss aborts on some values)."""
    for name, value, low, high in (
        ("--nlist", args.nlist, 1, 1 << 22),
        ("--nprobe", args.nprobe, 1, 1 << 22),
        ("--hnsw-m", args.hnsw_m, 2, 256),
    ):
        if value is not None and not low <= value <= high:
            raise UsageError(f"{name} must be within {low}..{high}; got {value}")


def _alias_factory(args: argparse.Namespace) -> str | None:
    """--kind/--nlist/--hnsw-m as a factory string (None: the default)."""
    if args.kind is None:
        return args.factory
    if args.factory is not None:
        raise UsageError("give --factory or --kind, not both")
    if args.kind == "flat":
        return "Flat"
    if args.kind == "hnsw":
        return f"HNSW{args.hnsw_m or 32}"
    if args.nlist is None:
        raise UsageError("--kind ivf needs --nlist N here (or give --factory IVF{N},Flat)")
    return f"IVF{args.nlist},Flat"


@command("index", "build, add to or remove from a catalog index for mbdl search", _configure_index)
def _run_index(args: argparse.Namespace) -> int:
    _check_index_aliases(args)
    if args.batch_size < 1 or args.workers < 0:
        raise UsageError("--batch-size must be >= 1 and --workers >= 0")
    if args.action in INDEX_ACTIONS:
        return INDEX_ACTIONS[args.action](args)
    if args.action == "build":
        if args.output is None:
            raise UsageError("index build needs -o INDEX")
        if args.images is None and args.list is None and args.embeddings is None:
            return _index_split(args)
        return _index_build(args)
    return _index_update(args)


def _print_build_report(report: Any, as_json: bool, verb: str) -> None:
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
        return
    catalog = report.catalog
    if report.factory_reason:
        print(f"index: {report.factory} ({report.factory_reason})")
    if report.resumed:
        print(f"resumed an interrupted build: {report.resumed} items were already embedded")
    if report.recall:
        recall = report.recall
        how = "exact search" if recall.get("exact") else f"on {recall['queries']} held-out queries"
        print(f"recall@{recall['k']} against exact search: {recall['recall']:.4f} ({how})")
    if report.skipped:
        where = f"; listed in {report.skipped_file}" if report.skipped_file else ""
        first, reason = report.skipped[0]
        print(
            f"skipped {len(report.skipped)} unreadable or non-image files, e.g. "
            f"{terminal_safe(first)} ({terminal_safe(reason)}){where}"
        )
    details = f"{report.added} added"
    if verb != "built":
        details += (
            f", {report.changed} of them changed files re-embedded, {report.unchanged} "
            f"unchanged, {report.touched} with only a new mtime, {report.removed} removed"
        )
    print(
        f"{verb} {terminal_safe(catalog.path)}: {len(catalog)} items of dimension {catalog.dim} "
        f"({catalog.distance}, {catalog.factory}); {details}; {report.seconds:.1f} s"
    )


def _index_build(args: argparse.Namespace) -> int:
    from mbdl.catalog import build_catalog

    if args.items:
        raise UsageError(f"unexpected argument {args.items[0]!r} with --images/--list/--embeddings")
    if args.split is not None or args.nprobe is not None:
        raise UsageError("--split and --nprobe do not apply with --images/--list/--embeddings")
    import torch

    from mbdl.distributed import init_distributed

    device = _device(args.device)
    info = init_distributed(device.type)  # under torchrun: each rank embeds a shard
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    try:
        report = build_catalog(
            args.checkpoint,
            args.output,
            images=args.images,
            list_file=args.list,
            embeddings=args.embeddings,
            labels=args.labels,
            factory=_alias_factory(args),
            on_bad=args.on_bad,
            device=str(device),
            batch_size=args.batch_size,
            workers=args.workers,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    finally:
        if info.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if info.is_main:
        _print_build_report(report, args.json, "built")
    return 0


def _index_update(args: argparse.Namespace) -> int:
    from mbdl.catalog import add_to_catalog, remove_from_catalog

    if args.output is not None or args.factory is not None or args.kind is not None:
        raise UsageError(f"-o, --factory and --kind do not apply to index {args.action}")
    if args.action == "add":
        if args.items:
            raise UsageError(f"unexpected argument {args.items[0]!r}: give --images or --list")
        report = add_to_catalog(
            args.checkpoint,
            images=args.images,
            list_file=args.list,
            labels=args.labels,
            on_bad=args.on_bad,
            model=args.model,
            device=str(_device(args.device)),
            batch_size=args.batch_size,
            workers=args.workers,
            progress=not args.no_progress,
        )
        _print_build_report(report, args.json, "updated")
        return 0
    if args.images or args.list or args.embeddings:
        raise UsageError("index remove takes PATHs (or --missing), not --images/--list")
    report = remove_from_catalog(args.checkpoint, args.items, missing=args.missing)
    _print_build_report(report, args.json, "updated")
    return 0


def _index_split(args: argparse.Namespace) -> int:
    """``mbdl index build CHECKPOINT [overrides] --split S``: the old gallery index of a split."""
    from mbdl.catalog.build import check_output
    from mbdl.index import GalleryIndex, model_fingerprint
    from mbdl.inference import embed_with_config, load_data

    if args.factory is not None:
        raise UsageError("--factory needs --images, --list or --embeddings (--split: use --kind)")
    check_output(Path(args.output), args.overwrite)
    args.split = args.split or "test"
    config, device, model = _checkpoint_model(args)
    splits = load_data(config)
    dataset = _split_dataset(splits, args.split)
    embeddings, labels = embed_with_config(model, dataset, config, device)
    # squared euclidean ranks as euclidean; the index reports euclidean distances
    distance = "cosine" if config.eval.distance == "cosine" else "euclidean"
    index = GalleryIndex.build(
        embeddings,
        labels,
        model_id=model_fingerprint(model.state_dict()),
        distance=distance,
        kind=args.kind or "flat",
        paths=[dataset.describe(i) for i in range(len(dataset))],
        class_names=list(dataset.class_names),
        nlist=args.nlist,
        nprobe=args.nprobe or 16,
        hnsw_m=args.hnsw_m or 32,
        seed=config.seed,
    )
    index.info = {
        "checkpoint": str(args.checkpoint),
        "split": args.split,
        "source": config.data.source,
        "image_size": int(splits.image_size),
        "channels": int(splits.channels),
        "imagenet_norm": config.model.pretrained is not None,
    }
    index.save(args.output)
    report = index.build_report
    details = ", ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in report.items()
    )
    print(
        f"indexed {len(index)} {args.split} items of dimension {index.dim} ({distance}): {details}"
    )
    print(f"model {index.model_id}; wrote {args.output}")
    return 0


# ---------------------------------------------------------------------------------------------
# mbdl export (implementation: mbdl.export)


def _configure_export(parser: argparse.ArgumentParser) -> None:
    from mbdl.export import DEFAULT_TOLERANCE, FORMATS

    parser.add_argument(
        "checkpoint",
        metavar="RUN|CHECKPOINT|MODEL_DIR",
        help="a run directory, a checkpoint .pt file or a model directory",
    )
    parser.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="onnx, torchscript: one file, its preprocessing in PATH.json next to it; "
        "safetensors: a model directory (weights, config, preprocessing, model card)",
    )
    parser.add_argument("-o", "--output", required=True, metavar="PATH", help="what to write")
    parser.add_argument(
        "--images",
        nargs="+",
        metavar="IMAGE",
        help="image files to check the export on (default: the model's first 16 test images)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"largest accepted |export - PyTorch| (default: {DEFAULT_TOLERANCE:g})",
    )
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="safetensors only: upload the model directory to the Hugging Face Hub repository "
        "REPO (owner/name; created when missing; the token of huggingface-cli login or HF_TOKEN)",
    )
    parser.add_argument(
        "--private", action="store_true", help="with --push-to-hub: create a private repository"
    )


@command(
    "export",
    "export the embedder to ONNX, TorchScript or a model directory, checked against PyTorch",
    _configure_export,
)
def _run_export(args: argparse.Namespace) -> int:
    from mbdl.export import check_images, export_file
    from mbdl.model.loading import load_state

    if not args.tolerance >= 0:
        raise UsageError(f"--tolerance must be >= 0, got {args.tolerance}")
    if args.push_to_hub is not None and args.format != "safetensors":
        raise UsageError(
            "--push-to-hub uploads a model directory: use it with --format safetensors"
        )
    if args.private and args.push_to_hub is None:
        raise UsageError("--private applies to --push-to-hub only")
    images = check_images(load_state(args.checkpoint), args.images)
    result = export_file(
        args.checkpoint, args.output, args.format, images, tolerance=args.tolerance
    )
    print(
        f"wrote {result['path']} ({args.format}, {result['bytes'] / 2**20:.2f} MiB) in "
        f"{result['export_s']:.2f} s; max |export - PyTorch| {result['max_abs_diff']:.2e} on "
        f"{result['images']} images"
    )
    if args.push_to_hub is not None:
        from mbdl.export import push_to_hub

        url = push_to_hub(result["path"], args.push_to_hub, private=args.private)
        print(f"pushed to https://huggingface.co/{args.push_to_hub} ({url})")
    return 0


# ---------------------------------------------------------------------------------------------
# mbdl data


def _configure_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        choices=("glyphs", "icons"),
        help="glyphs: build and describe the embedded glyphs cache; icons: build the icons data "
        "set from the installed freedesktop icon themes into --out",
    )
    parser.add_argument(
        "--cache-dir", help="where the glyphs cache lives (default: $MBDL_CACHE or ~/.cache/mbdl)"
    )
    parser.add_argument(
        "--out", metavar="DIR", help="icons: the new folder to write (one folder per class)"
    )
    parser.add_argument(
        "--themes-dir",
        default="/usr/share/icons",
        metavar="DIR",
        help="icons: where the icon themes are installed (default: /usr/share/icons)",
    )
    parser.add_argument(
        "--size", type=int, default=128, help="icons: image side in pixels (default: 128)"
    )
    parser.add_argument(
        "--min-families",
        type=int,
        default=4,
        help="icons: keep icon names drawn by at least this many theme families (default: 4)",
    )


@command("data", "build and describe a local data set (glyphs, icons)", _configure_data)
def _run_data(args: argparse.Namespace) -> int:
    if args.source == "icons":
        from mbdl.data.builders.icons import build_icons, describe_icons

        if args.out is None:
            raise UsageError("mbdl data icons needs --out DIR (the folder to create)")
        manifest = build_icons(
            args.out, themes_dir=args.themes_dir, size=args.size, min_families=args.min_families
        )
        print(describe_icons(manifest, args.out))
        return 0
    from mbdl.data.glyphs import describe_glyphs

    print(describe_glyphs(cache_dir=args.cache_dir))
    return 0


# ---------------------------------------------------------------------------------------------
# mbdl scan


def _configure_scan(parser: argparse.ArgumentParser) -> None:
    _add_config_items(
        parser,
        "the config and overrides a training would use, e.g. data.source=folder "
        "data.root=/data/birds",
    )
    parser.add_argument(
        "--per-class", action="store_true", help="also list the image count of every class"
    )


@command(
    "scan",
    "check a training's data before training: every image, counts per class, the config "
    "against the data (exit 2 on any problem)",
    _configure_scan,
)
def _run_scan(args: argparse.Namespace) -> int:
    import warnings

    import numpy as np

    from mbdl.config import load_config
    from mbdl.data.sources import SOURCES
    from mbdl.inference import load_data
    from mbdl.train.preflight import describe_data, validate_before_training

    overrides, others = split_overrides(args.items)
    if len(others) > 1:
        raise UsageError(f"expected at most one config file, got {', '.join(others)}")
    config = load_config(others[0] if others else None, overrides)
    asked_to_skip = config.data.skip_corrupt
    if SOURCES.get(config.data.source).accepts("skip_corrupt"):
        config.data.skip_corrupt = True  # list every unreadable image, not only the first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        splits = load_data(config)
    print(terminal_safe(describe_data(splits)))
    info = splits.info or {}
    for line in info.get("skipped_files", []):
        print(f"  unreadable: {terminal_safe(line)}")
    for line in info.get("duplicates", []):
        print(f"  counted once: {terminal_safe(line)}")
    if args.per_class:
        for name in ("train", "val", "test"):
            dataset = getattr(splits, name)
            counts = np.bincount(np.asarray(dataset.labels), minlength=len(dataset.class_names))
            for class_name, count in zip(dataset.class_names, counts.tolist(), strict=True):
                print(f"  {name:<5} {count:>7}  {terminal_safe(class_name)}")
    validate_before_training(config, splits)
    unreadable = len(info.get("skipped_files", []))
    if unreadable and not asked_to_skip:
        raise UserError(
            f"{unreadable} image(s) cannot be used (listed above); fix or remove them, or set "
            "data.skip_corrupt=true"
        )
    return 0


# ---------------------------------------------------------------------------------------------
# mbdl compare (implementation: mbdl.compare)


def _configure_compare(parser: argparse.ArgumentParser) -> None:
    from mbdl.compare import configure_parser

    configure_parser(parser)


@command(
    "compare",
    "train several losses under one budget, tune each on validation, compare on test",
    _configure_compare,
)
def _run_compare(args: argparse.Namespace) -> int:
    from mbdl.compare import run_cli

    return run_cli(args, split_overrides)


# ---------------------------------------------------------------------------------------------
# mbdl dedup, mbdl cluster (implementation: mbdl.catalog.dedup)


def _configure_groups(parser: argparse.ArgumentParser, clusters: bool) -> None:
    parser.add_argument("source", metavar="INDEX|DIR", help="an index, or a folder of images")
    parser.add_argument("-o", "--out", required=True, metavar="OUT", help="the output folder")
    parser.add_argument("--model", help="the model that indexes DIR (a run, checkpoint, model dir)")
    parser.add_argument(
        "--threshold",
        type=float,
        metavar="D",
        help="the distance at or below which two items are the same (default: the model's "
        "validated verification threshold)",
    )
    if clusters:
        parser.add_argument(
            "--min-size", type=int, default=2, help="the smallest cluster kept (default 2)"
        )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _run_groups(args: argparse.Namespace, kind: str) -> int:
    from mbdl.catalog.dedup import group_images

    groups = group_images(
        args.source,
        args.out,
        kind=kind,
        model=args.model,
        threshold=args.threshold,
        min_size=getattr(args, "min_size", 2),
        device=args.device,
        progress=not args.no_progress,
    )
    noun = "groups of near-duplicates" if kind == "duplicates" else "clusters"
    print(
        f"{len(groups.groups)} {noun} holding {groups.grouped_items} of {groups.count} items "
        f"({groups.distance} distance <= {groups.threshold:.4g}); examined "
        f"{groups.pairs_examined} pairs (all pairs: {groups.quadratic_pairs})"
    )
    print(f"wrote {terminal_safe(Path(args.out) / 'index.html')}, groups.csv, groups.json")
    return 0


@command(
    "dedup",
    "find groups of near-duplicate images in an index or a folder",
    lambda parser: _configure_groups(parser, clusters=False),
)
def _run_dedup(args: argparse.Namespace) -> int:
    return _run_groups(args, "duplicates")


@command(
    "cluster",
    "group an index or a folder into clusters of similar images",
    lambda parser: _configure_groups(parser, clusters=True),
)
def _run_cluster(args: argparse.Namespace) -> int:
    return _run_groups(args, "clusters")


# ---------------------------------------------------------------------------------------------
# mbdl index export (implementation: mbdl.catalog.engines)


def _index_export(args: argparse.Namespace) -> int:
    from mbdl.catalog import Catalog
    from mbdl.catalog.engines import export_catalog

    if args.to is None:
        raise UsageError("index export needs --to ENGINE:LOCATION (qdrant:DIR or milvus:FILE.db)")
    with Catalog.open(args.checkpoint) as catalog:
        done = export_catalog(catalog, args.to, collection=args.collection, replace=args.replace)
    print(
        f"exported {done.count} items ({done.dim}-d, {done.distance}) to {done.engine} "
        f"{terminal_safe(done.location)}, collection {done.collection!r}"
    )
    return 0


INDEX_ACTIONS["export"] = _index_export


# ---------------------------------------------------------------------------------------------
# mbdl serve (implementation: mbdl.serve)


def _configure_serve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index", metavar="INDEX", help="the index to serve")
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--token", help="require 'Authorization: Bearer TOKEN' (default: env MBDL_SERVE_TOKEN)"
    )
    parser.add_argument(
        "--max-upload-bytes", type=int, help="the largest upload accepted (default 20 MiB)"
    )
    parser.add_argument(
        "--max-pixels", type=int, help="the most pixels a query image may have (default 40 M)"
    )
    parser.add_argument("--device", default="cpu")


@command("serve", "serve an index: a JSON search API and a search page", _configure_serve)
def _run_serve(args: argparse.Namespace) -> int:
    from mbdl.serve import serve

    limits = {
        name: getattr(args, name)
        for name in ("max_upload_bytes", "max_pixels")
        if getattr(args, name) is not None
    }
    serve(
        args.index,
        host=args.host,
        port=args.port,
        token=args.token or os.environ.get("MBDL_SERVE_TOKEN") or None,
        device=args.device,
        **limits,
    )
    return 0


# ---------------------------------------------------------------------------------------------
# entry point


def build_parser() -> argparse.ArgumentParser:
    """The ``mbdl`` parser with every registered subcommand."""
    parser = _Parser(
        prog="mbdl",
        description="Deep metric learning with the Margin-based Discriminate Loss.",
    )
    parser.add_argument("--version", action="version", version=f"mbdl {mbdl.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, entry in COMMANDS.items():
        sub = subparsers.add_parser(name, help=entry.help, description=entry.help)
        entry.configure(sub)
        sub.set_defaults(run=entry.run)
    return parser


def _one_line(error: BaseException) -> str:
    return one_line(error)


def _out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, (MemoryError, torch.OutOfMemoryError))


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mbdl`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code.

    Bad input (:class:`mbdl.errors.UserError`, ``ValueError``, ``OSError``, memory exhausted)
    prints one terminal-safe line and returns 2; a diverged run 1; an interrupt 130.
    ``MBDL_DEBUG=1`` re-raises instead, for the traceback.
    """
    from mbdl.errors import TrainingDiverged

    debug = os.environ.get("MBDL_DEBUG", "") not in ("", "0")
    try:
        parser = build_parser()
        args, extras = parser.parse_known_args(argv)
        # overrides and paths may come after options: they land in extras; give them to items
        unknown = [e for e in extras if e.startswith("-") and not Path(e).exists()]
        if unknown:
            raise UsageError(f"unrecognized arguments: {' '.join(unknown)}")
        if extras:
            if not hasattr(args, "items"):
                raise UsageError(f"unrecognized arguments: {' '.join(extras)}")
            args.items = [*(args.items or []), *extras]
        if getattr(args, "run", None) is None:
            parser.print_help(sys.stderr)
            return EXIT_USER_ERROR
        return int(args.run(args))
    except UsageError as error:
        print(f"mbdl: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingDiverged as error:
        if debug:
            raise
        print(f"mbdl: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print("mbdl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        if debug or not (isinstance(error, USER_ERRORS) or _out_of_memory(error)):
            raise
        message = _one_line(error)
        if _out_of_memory(error):
            message = (
                f"out of memory ({message}); lower eval.batch_size, train.batch_classes or "
                "data.image_size, or use a machine with more memory"
            )
        print(f"mbdl: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
