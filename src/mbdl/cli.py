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
from typing import Any, NoReturn

import mbdl
from mbdl.errors import (
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    UserError,
    one_line,
    terminal_safe,
)

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
    from mbdl.inference import format_metrics

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
    if metrics.get("validation"):
        print(f"validation ({config.train.select_metric} selected):")
        _print_metrics(metrics["validation"])
    print("test:")
    _print_metrics(metrics["test"])
    report = Path(str(config.out)) / "report.html"
    if report.is_file():
        print(f"report: {report}")
    return 0


# ---------------------------------------------------------------------------------------------
# loading a checkpoint's data


def _checkpoint_config(checkpoint: str, overrides: list[str]) -> tuple[Any, dict[str, Any]]:
    """The config stored in a checkpoint, with ``data.*`` / ``eval.*`` overrides applied."""
    from mbdl.config import config_from_flat, parse_override, stored_config_values
    from mbdl.export import load_state

    state = load_state(checkpoint)
    if not state.get("config"):
        raise UsageError(f"{checkpoint} records no training config (its data): cannot run this")
    flat = stored_config_values(state["config"], "checkpoint config")
    for text in overrides:
        key, value = parse_override(text)
        if not key.startswith(("data.", "eval.")) and key != "seed":
            raise UsageError(f"only data.*, eval.* and seed overrides apply here; got {key}")
        flat[key] = value
    flat["resume"] = False
    return config_from_flat(flat), state


def _split_dataset(splits: Any, name: str) -> Any:
    dataset = getattr(splits, name, None)
    if dataset is None:
        raise UsageError(f"data source {splits.source} has no {name} split")
    if len(dataset) == 0:
        raise UsageError(f"the {name} split is empty")
    return dataset


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
    from mbdl.inference import resolve_device

    return resolve_device(name)


def _checkpoint_model(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """``(config, device, model)`` for a command taking ``CHECKPOINT [data/eval overrides]``."""
    from mbdl.train.checkpoint import model_from_state

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
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.add_argument("-o", "--output", metavar="FILE", help="also write the metrics as JSON")


@command("eval", "evaluate a trained model on the test (or validation) classes", _configure_eval)
def _run_eval(args: argparse.Namespace) -> int:
    from mbdl.fileio import atomic_write_text
    from mbdl.inference import evaluate_dataset, evaluate_test, load_data

    config, device, model = _checkpoint_model(args)
    splits = load_data(config)
    if args.split == "test":
        metrics, embeddings, labels = evaluate_test(model, splits, config, device)
    else:
        dataset = _split_dataset(splits, "val")
        metrics, embeddings, labels = evaluate_dataset(model, dataset, config, device)
    metrics.update(_rates_at_stored_threshold(args.checkpoint, config, embeddings, labels))
    if args.output:
        atomic_write_text(args.output, json.dumps(metrics, indent=2) + "\n")
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        _print_metrics(metrics)
    return 0


def _rates_at_stored_threshold(
    checkpoint: str, config: Any, embeddings: Any, labels: Any
) -> dict[str, float]:
    """``tar@threshold`` and ``far@threshold`` of a split at the checkpoint's stored verification
    threshold (none when it has none, or when eval.distance was overridden)."""
    import torch

    from mbdl.export import load_state
    from mbdl.inference import verification_at_threshold

    stored = load_state(checkpoint).get("verification")
    if not isinstance(stored, dict) or stored.get("distance") != config.eval.distance:
        return {}
    if torch.unique(labels).numel() < 2:
        return {}
    return verification_at_threshold(embeddings, labels, config, float(stored["threshold"]))


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
    from mbdl.inference import embed_with_config, load_data

    config, device, model = _checkpoint_model(args)
    dataset = _split_dataset(load_data(config), args.split)
    embeddings, labels = embed_with_config(model, dataset, config, device)
    buffer = io.BytesIO()
    np.savez(
        buffer,
        embeddings=embeddings.numpy(),
        labels=labels.numpy(),
        class_names=np.array(dataset.class_names, dtype=str),
        items=np.array([dataset.describe(i) for i in range(len(dataset))], dtype=str),
    )
    atomic_write_bytes(args.output, buffer.getvalue())
    print(
        f"wrote {len(dataset)} embeddings of dimension {embeddings.shape[1]} "
        f"({args.split} split) to {args.output}"
    )
    return 0


def _embed_streaming(args: argparse.Namespace, overrides: list[str]) -> int:
    """``mbdl embed ... -o X.npy``: stream into memory-mapped files; one shard per torchrun rank."""
    import torch

    from mbdl.data.workers import loader_workers
    from mbdl.distributed import init_distributed
    from mbdl.embedstore import ImageFiles, embed_to_files, model_dim, output_paths
    from mbdl.export import load_state, state_preprocessing, transform_from_spec
    from mbdl.train.checkpoint import model_from_state

    output_paths(args.output)  # checks the name before any work
    device = _device(args.device)
    info = init_distributed(device.type)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    try:
        if args.images is not None:
            if overrides:
                raise UsageError(f"{overrides[0]!r}: overrides do not apply with --images")
            state = load_state(args.checkpoint)
            model = model_from_state(state, device)
            spec = state_preprocessing(state)
            dataset = ImageFiles(args.images, transform_from_spec(spec), spec["color_mode"])
            batch_size, workers = args.batch_size or 256, args.workers or 0
            class_names, what = dataset.class_names, f"images below {args.images}"
        else:
            config, state = _checkpoint_config(args.checkpoint, overrides)
            model = model_from_state(state, device)
            spec = state_preprocessing(state)
            dataset = _split_dataset(_load_data_once(config), args.split)
            batch_size = args.batch_size or config.eval.batch_size
            workers = (
                loader_workers(config.data.num_workers, dataset, training=False)
                if args.workers is None
                else args.workers
            )
            class_names, what = list(dataset.class_names), f"{args.split} split"
        distance = ((state.get("config") or {}).get("eval") or {}).get("distance", "euclidean")
        files = embed_to_files(
            model,
            dataset,
            args.output,
            dim=model_dim(model, dataset[0][0]),
            batch_size=batch_size,
            device=device,
            num_workers=workers,
            progress=not args.no_progress,
            info={
                "source": what,
                "model": str(args.checkpoint),
                "distance": distance,
                "class_names": class_names,
                "preprocessing": spec,
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
    from mbdl.inference import load_data

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
        "checkpoint", metavar="CHECKPOINT", help="a run directory, a .pt file or a model directory"
    )
    parser.add_argument(
        "items",
        nargs="*",
        metavar="[KEY=VALUE ...] IMAGE",
        help="data.* / eval.* overrides, then the query image files",
    )
    parser.add_argument(
        "--gallery-split",
        "--gallery",
        default="test",
        choices=_SPLITS,
        help="the split searched (default: test)",
    )
    parser.add_argument("-k", type=int, default=5, help="neighbours per query (default: 5)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--index",
        metavar="INDEX",
        help="search this gallery index (from mbdl index build) instead of embedding a split; "
        "CHECKPOINT must be the model the index was built with",
    )
    parser.add_argument(
        "--threshold",
        nargs="?",
        const="checkpoint",
        metavar="DISTANCE",
        help="mark the neighbours within this distance as matches; without a value: the "
        "verification threshold mbdl train chose on the validation classes",
    )


@command("search", "find the nearest gallery images of query images", _configure_search)
def _run_search(args: argparse.Namespace) -> int:
    import torch

    from mbdl.data.files import read_image
    from mbdl.functional.distances import pairwise_distance
    from mbdl.inference import embed_with_config, load_data
    from mbdl.train.checkpoint import model_from_state

    overrides, images = split_overrides(args.items)
    if not images:
        raise UsageError("give at least one query IMAGE")
    if args.k < 1:
        raise UsageError(f"-k must be at least 1, got {args.k}")
    # decoded by the data sets' table (16-bit, alpha, EXIF...), size-checked before decoding
    queries = [read_image(path, "RGB") for path in images]
    if args.index is not None:
        return _search_index(args, images, queries, overrides)
    config, state = _checkpoint_config(args.checkpoint, overrides)
    threshold = _match_threshold(args.threshold, state, config.eval.distance)
    device = _device(args.device)
    model = model_from_state(state, device)
    gallery = _split_dataset(load_data(config), args.gallery_split)
    gallery_embeddings, gallery_labels = embed_with_config(model, gallery, config, device)
    transform = gallery.transform  # the split's evaluation transform
    with torch.inference_mode():
        batch = torch.stack([transform(image) for image in queries]).to(device)
        query_embeddings = model(batch).float().cpu()
    # float64, as `mbdl verify` measures a pair: in float32 the expansion |q|^2 + |g|^2 - 2 q.g
    # cancels near 0, so an image searched against itself read 0.0005 instead of 1e-7
    distances = pairwise_distance(
        query_embeddings.double(), gallery_embeddings.double(), config.eval.distance
    )
    k = min(args.k, len(gallery))
    values, indices = torch.topk(distances, k, dim=1, largest=False)
    for path, row_values, row_indices in zip(images, values, indices, strict=True):
        print(f"query {terminal_safe(path)}")
        for rank, (distance, index) in enumerate(
            zip(row_values.tolist(), row_indices.tolist(), strict=True), start=1
        ):
            label = int(gallery_labels[index])
            name = gallery.class_names[label]
            mark = _match_mark(distance, threshold)
            print(
                f"  {rank:>3}  {distance:.4f}{mark}  {terminal_safe(repr(name)):<12}  "
                f"{terminal_safe(gallery.describe(index))}"
            )
    return 0


def _stored_verification(state: dict[str, Any]) -> dict[str, Any]:
    verification = state.get("verification")
    if not isinstance(verification, dict) or "threshold" not in verification:
        raise UsageError(
            "this checkpoint has no verification threshold (it had no validation classes, or "
            "was trained before mbdl stored one): give one with --threshold DISTANCE"
        )
    return verification


def _match_threshold(value: str | None, state: dict[str, Any], distance: str) -> float | None:
    """The ``--threshold`` of search and verify: a number, or the checkpoint's stored one."""
    if value is None:
        return None
    if value == "checkpoint":
        stored = _stored_verification(state)
        if stored.get("distance") == "squared_euclidean" and distance == "euclidean":
            return math.sqrt(max(float(stored["threshold"]), 0.0))  # the same decisions
        if stored.get("distance", distance) != distance:
            raise UsageError(
                f"the stored threshold is a {stored['distance']} distance but eval.distance is "
                f"{distance}: drop the eval.distance override or give --threshold DISTANCE"
            )
        return float(stored["threshold"])
    try:
        threshold = float(value)
    except ValueError:
        raise UsageError(f"--threshold must be a number; got {value!r}") from None
    if not math.isfinite(threshold):
        raise UsageError(f"--threshold must be finite; got {value!r}")
    return threshold


def _match_mark(distance: float, threshold: float | None) -> str:
    if threshold is None:
        return ""
    return "  match" if distance <= threshold else "       "


def _search_index(
    args: argparse.Namespace, images: list[str], queries: list[Any], overrides: list[str]
) -> int:
    """``mbdl search --index INDEX CHECKPOINT IMAGE...``: embed the queries, search the index."""
    import torch

    from mbdl.data import build_transforms
    from mbdl.export import load_state
    from mbdl.index import GalleryIndex, model_fingerprint
    from mbdl.train.checkpoint import model_from_state

    if overrides:
        raise UsageError(
            f"{overrides[0]!r}: overrides do not apply with --index (the index is the gallery)"
        )
    index = GalleryIndex.load(args.index)
    state = load_state(args.checkpoint)
    device = _device(args.device)
    model = model_from_state(state, device)
    threshold = _match_threshold(
        args.threshold, state, "cosine" if index.distance == "cosine" else "euclidean"
    )
    model_id = model_fingerprint(model.state_dict())
    if model_id != index.model_id:
        raise ValueError(
            f"checkpoint {args.checkpoint} (model {model_id}) is not the model index {args.index} "
            f"was built with ({index.model_id}); use that checkpoint or rebuild the index"
        )
    data_args = state.get("data_args", {})
    transform = build_transforms(
        False,
        int(index.info.get("image_size", data_args.get("image_size", 32))),
        int(index.info.get("channels", data_args.get("channels", 3))),
        imagenet_norm=bool(index.info.get("imagenet_norm", False)),
    )
    with torch.inference_mode():
        batch = torch.stack([transform(image) for image in queries]).to(device)
        query_embeddings = model(batch).float().cpu()
    distances, indices = index.search(query_embeddings, min(args.k, len(index)), model_id=model_id)
    for path, row_values, row_indices in zip(images, distances, indices, strict=True):
        print(f"query {terminal_safe(path)}")
        for rank, (distance, item) in enumerate(
            zip(row_values.tolist(), row_indices.tolist(), strict=True), start=1
        ):
            if item < 0:  # an approximate index found fewer than k items
                break
            label = int(index.labels[item])
            name = index.class_names[label] if label < len(index.class_names) else str(label)
            where = index.paths[item] if item < len(index.paths) else f"#{item}"
            mark = _match_mark(distance, threshold)
            print(
                f"  {rank:>3}  {distance:.4f}{mark}  {terminal_safe(repr(name)):<12}  "
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
    import torch
    from PIL import Image, UnidentifiedImageError

    from mbdl.data import build_transforms
    from mbdl.export import load_state
    from mbdl.functional.verification import paired_distances
    from mbdl.train.checkpoint import model_from_state

    state = load_state(args.checkpoint)
    distance_name = str(state.get("config", {}).get("eval", {}).get("distance", "euclidean"))
    threshold = _match_threshold(args.threshold or "checkpoint", state, distance_name)
    assert threshold is not None
    images = []
    for path in (args.first, args.second):
        try:
            with Image.open(path) as image:
                images.append(image.copy())
        except (OSError, UnidentifiedImageError) as error:
            raise ValueError(f"cannot read image {path!r}: {error}") from None
    device = _device(args.device)
    model = model_from_state(state, device)
    data_args = state.get("data_args", {})
    pretrained = state.get("config", {}).get("model", {}).get("pretrained")
    transform = build_transforms(
        False,
        int(data_args.get("image_size", 32)),
        int(data_args.get("channels", 3)),
        imagenet_norm=pretrained is not None,
    )
    with torch.inference_mode():
        batch = torch.stack([transform(image) for image in images]).to(device)
        embeddings = model(batch).float().cpu()
    # the pair's own distance, as the stored threshold was chosen (float64; not a GEMM
    # expansion, whose rounding leaves two identical images about 3e-4 apart)
    distance = float(paired_distances(embeddings[:1], embeddings[1:], distance_name)[0])
    same = distance <= threshold
    stored = state.get("verification") or {}
    answer = {
        "same": same,
        "distance": distance,
        "threshold": threshold,
        "distance_kind": distance_name,
        "threshold_source": "--threshold" if args.threshold else "validation classes",
        "far": None if args.threshold else stored.get("far"),
    }
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    verdict = "same" if same else "different"
    where = (
        "given with --threshold"
        if args.threshold
        else f"chosen on the validation classes at FAR {stored.get('far', float('nan')):g}"
    )
    print(
        f"{verdict}: {distance_name} distance {distance:.4f} "
        f"{'<=' if same else '>'} threshold {threshold:.4f} ({where})"
    )
    return 0


# ---------------------------------------------------------------------------------------------
# mbdl index


def _configure_index(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("build",), help="build: embed a split and index it")
    _add_checkpoint_args(parser, "CHECKPOINT")
    parser.add_argument("--split", default="test", choices=_SPLITS, help="default: test")
    parser.add_argument(
        "--kind",
        default="flat",
        choices=("flat", "ivf", "hnsw"),
        help="flat: exact (default); ivf, hnsw: approximate, for large galleries (their recall "
        "against exact search is reported)",
    )
    parser.add_argument("--nlist", type=int, help="ivf lists (default: 4 sqrt(N))")
    parser.add_argument("--nprobe", type=int, default=16, help="ivf lists visited (default: 16)")
    parser.add_argument("--hnsw-m", type=int, default=32, help="hnsw neighbours (default: 32)")
    parser.add_argument(
        "-o", "--output", required=True, metavar="INDEX", help="the index directory to write"
    )


@command(
    "index", "build a faiss gallery index of a split for mbdl search --index", _configure_index
)
def _run_index(args: argparse.Namespace) -> int:
    from mbdl.index import GalleryIndex, model_fingerprint
    from mbdl.inference import embed_with_config, load_data

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
        kind=args.kind,
        paths=[dataset.describe(i) for i in range(len(dataset))],
        class_names=list(dataset.class_names),
        nlist=args.nlist,
        nprobe=args.nprobe,
        hnsw_m=args.hnsw_m,
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
    from mbdl.export import check_images, export_file, load_state

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
        from mbdl.data.icons import build_icons, describe_icons

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
