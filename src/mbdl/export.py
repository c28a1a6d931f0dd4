"""Take a trained embedder out of mbdl: a model directory, ONNX and TorchScript files.

A **model directory** (``save_pretrained`` / :func:`load_embedder`, the layout of Hugging Face
Hub model repositories) holds:

- ``model.safetensors``: the weights of the whole embedder (backbone, head; the L2 normalisation
  has none), readable without pickle;
- ``config.json``: ``format`` ("mbdl-model"), ``version``, ``model_args`` (rebuild the
  architecture with :func:`mbdl.models.build_model`), ``data_args``, ``distance``, ``validation``
  and ``test`` metrics, ``verification`` (the threshold and its metrics, when the checkpoint has
  one), ``training_config`` (the run's config, for ``mbdl eval`` on the same data);
- ``preprocessing.json``: what an image must go through before the model (:func:`preprocessing_spec`);
- ``README.md``: a model card (data, loss, metrics with their split, the training command).

Every mbdl command that takes a run directory or a checkpoint also takes a model directory
(:func:`load_state`). ``mbdl export --format onnx|torchscript`` writes one file and, next to it,
``<file name>.json`` with the preprocessing; the exported model is run on real images against
PyTorch and refused when their largest difference exceeds the tolerance.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

import mbdl
from mbdl.fileio import (
    atomic_directory,
    atomic_write_text,
    default_file_mode,
    naming,
    read_json_bounded,
    remove_stale_temps,
    temp_sibling,
)
from mbdl.model.checkpoint import model_from_state
from mbdl.model.loading import (
    CARD_FILE,
    CONFIG_FILE,
    HUB_PREFIX,
    MODEL_FORMAT,
    MODEL_VERSION,
    PREPROCESSING_FILE,
    WEIGHTS_FILE,
    MissingExtra,
    _load_model_dir,  # noqa: F401 (re-exported for code written before it moved)
    hub_download,
    is_model_dir,
    load_embedder,
    load_state,
    missing_extra,
    state_preprocessing,
    state_record,
)
from mbdl.model.preprocessing import preprocessing_spec, transform_from_spec

FORMATS = ("onnx", "torchscript", "safetensors")
#: largest |exported - PyTorch| accepted on an L2-normalised embedding
DEFAULT_TOLERANCE = 1e-4

Format = Literal["onnx", "torchscript", "safetensors"]


# ---------------------------------------------------------------------------------------------
# the model directory


def push_to_hub(
    directory: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
) -> str:
    """Upload the model directory ``directory`` to the Hub repository ``repo_id`` (created when
    missing); returns the commit URL. Load it back with ``load_embedder("hf://" + repo_id)``."""
    if not is_model_dir(directory):
        raise ValueError(f"{str(directory)!r} is not an mbdl model directory")
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise missing_extra("huggingface_hub", "hub") from None
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return str(api.upload_folder(folder_path=str(directory), repo_id=repo_id))


def _reproducing_command(config: dict[str, Any]) -> str:
    """``mbdl train key=value ...`` with the keys of ``config`` that differ from the defaults."""
    from mbdl.config import _flatten, config_from_flat, config_to_flat, load_config

    try:
        flat = config_to_flat(config_from_flat(_flatten(dict(config), "config")))
    except ValueError:
        return "(the run's config.yaml)"
    defaults = config_to_flat(load_config(None, []))
    skipped = {"out", "resume"}
    parts = [
        shlex.quote(f"{key}={value if isinstance(value, str) else json.dumps(value)}")
        for key, value in flat.items()
        if key not in skipped and defaults.get(key) != value
    ]
    return " ".join(["mbdl train", *parts])


def _metrics_table(metrics: dict[str, Any]) -> list[str]:
    """The metric table, then the run metadata (k-means settings, pair counts) as integers."""
    from mbdl.evaluate import split_metrics

    table, meta = split_metrics(
        {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
    )
    rows = ["| metric | value |", "|---|---|"]
    rows += [f"| {k} | {v:.4f} |" for k, v in table.items() if isinstance(v, (int, float))]
    if meta:
        rows += ["", "(" + ", ".join(f"{k} {v}" for k, v in meta.items()) + ")"]
    return rows


def card_metadata(info: dict[str, Any]) -> dict[str, Any]:
    """The Hub metadata of a model card (its YAML front matter): ``library_name``, ``tags``,
    ``pipeline_tag: image-feature-extraction``, ``license`` (``info["license"]``, else
    ``other``), ``base_model`` (the Hub model the backbone's weights came from: ``hf/<id>``,
    or ``timm/<name>`` with timm's own weights), ``datasets`` (a Hub data set id, for
    ``data.source=hf`` with a root of that form) and the test and validation metrics as a
    ``model-index``."""
    config = info.get("training_config") or {}
    data = config.get("data", {})
    model_config = config.get("model", {})
    backbone = str(info["model_args"].get("backbone", ""))
    meta: dict[str, Any] = {
        "library_name": "mbdl",
        "tags": ["metric-learning", "image-retrieval", "embeddings"],
        "pipeline_tag": "image-feature-extraction",
        "license": str(info.get("license") or "other"),
    }
    if backbone.startswith("hf/") and not Path(backbone[3:]).expanduser().exists():
        meta["base_model"] = backbone[3:]
    elif backbone.startswith("timm/") and model_config.get("pretrained") == "DEFAULT":
        meta["base_model"] = backbone
    root = str(data.get("root") or "")
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", root) is not None and not Path(root).exists()
    if data.get("source") == "hf" and hub_id:
        meta["datasets"] = [root]
    results = []
    for split, title in (("test", "test classes"), ("validation", "validation classes")):
        metrics = {
            k: float(v)
            for k, v in (info.get(split) or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if metrics:
            results.append(
                {
                    "task": {"type": "image-feature-extraction", "name": "Image retrieval"},
                    "dataset": {
                        "name": f"{data.get('source', 'unknown')} ({title})",
                        "type": str(data.get("source", "unknown")),
                    },
                    "metrics": [
                        {"type": k, "value": round(v, 6), "name": f"{k} ({title})"}
                        for k, v in metrics.items()
                    ],
                }
            )
    if results:
        meta["model-index"] = [{"name": info.get("name") or "mbdl embedder", "results": results}]
    return meta


def model_card(info: dict[str, Any]) -> str:
    """The ``README.md`` of a model directory, from its ``config.json`` values: the Hub
    metadata (:func:`card_metadata`) as YAML front matter, then the description."""
    import yaml

    config = info.get("training_config") or {}
    data = config.get("data", {})
    loss = config.get("loss", {})
    model = info["model_args"]
    pre = info["preprocessing"]
    lines = [
        "---",
        yaml.safe_dump(card_metadata(info), sort_keys=False).rstrip(),
        "---",
        "",
        f"# {info.get('name') or 'mbdl embedder'}",
        "",
        f"An image embedder trained with mbdl {info.get('mbdl_version', '')}: `{model['backbone']}` backbone, linear head to "
        f"{model['embedding_dim']} dimensions, L2-normalised; compare embeddings with the "
        f"{info.get('distance', 'euclidean')} distance.",
        "",
        "## Data",
        "",
        f"- source: `{data.get('source', 'unknown')}`"
        + (f" (root `{data['root']}`)" if data.get("root") else ""),
        f"- input: {pre['color_mode']} images, shorter side resized to {pre['resize']}, centre crop "
        f"{pre['crop']}x{pre['crop']}, scaled to [0, 1], mean {pre['mean']}, std {pre['std']} "
        f"(`{PREPROCESSING_FILE}`)",
        "",
        "## Loss",
        "",
        f"- `{loss.get('name', 'unknown')}`"
        + (
            ": " + ", ".join(f"{k}={v}" for k, v in loss.items() if k != "name")
            if len(loss) > 1
            else ""
        ),
        "",
        "## Metrics",
        "",
    ]
    for split, title in (
        ("validation", "Validation classes (model selection)"),
        ("test", "Test classes (held out, evaluated once)"),
    ):
        metrics = info.get(split) or {}
        if metrics:
            lines += [f"{title}:", "", *_metrics_table(metrics), ""]
    if not info.get("validation") and not info.get("test"):
        lines += ["No metrics were recorded with this model.", ""]
    verification = info.get("verification")
    if verification:
        lines += [
            "## Verification threshold",
            "",
            "```json",
            json.dumps(verification, indent=2),
            "```",
            "",
        ]
    lines += [
        "## Training command",
        "",
        "```bash",
        str(info.get("command", "")),
        "```",
        "",
        "## Use",
        "",
        "```python",
        "import mbdl",
        "",
        'model, transform = mbdl.load_embedder("path/to/this/directory")',
        "embeddings = model(transform(image).unsqueeze(0))",
        "```",
        "",
    ]
    return "\n".join(lines)


def _run_dir_of(path: Path) -> Path | None:
    """The run directory of a run directory or of ``RUN/checkpoints/x.pt``."""
    if path.is_dir() and (path / "checkpoints").is_dir():
        return path
    if path.is_file() and path.parent.name == "checkpoints":
        return path.parent.parent
    return None


def save_pretrained(
    source: str | os.PathLike[str], directory: str | os.PathLike[str], *, name: str | None = None
) -> Path:
    """Write the model directory of a run, checkpoint or model directory ``source``.

    The directory is assembled in a temporary sibling and moved into place: it is either the
    old one or the complete new one. An existing non-model directory is refused.
    """
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ImportError("safetensors is not installed; run: pip install safetensors") from None
    target = Path(directory)
    if target.exists() and not is_model_dir(target):
        if not target.is_dir() or any(target.iterdir()):
            raise ValueError(f"{str(target)!r} exists and is not an mbdl model directory")
    state = load_state(source)
    record = state_record(state, str(source))
    stored = record.stored_fields()
    info: dict[str, Any] = {
        "format": MODEL_FORMAT,
        "version": MODEL_VERSION,
        "mbdl_version": mbdl.__version__,
        "name": name or target.name,
        "model_args": stored["model_args"],
        "data_args": stored["data_args"],
        "preprocessing": stored["preprocessing"],
        "distance": record.distance,
        "validation": dict(record.provenance.validation),
        "test": dict(record.provenance.test),  # a model directory's own, when re-saved
        "verification": stored["verification"],
        "training_config": dict(record.provenance.training_config),
    }
    if record.provenance.command is not None:
        info["command"] = record.provenance.command
    run_dir = _run_dir_of(Path(source))
    if run_dir is not None and (run_dir / "metrics.json").is_file():
        metrics = read_json_bounded(run_dir / "metrics.json")
        test = metrics.get("test") if isinstance(metrics, dict) else None
        info["test"] = dict(test) if isinstance(test, dict) else {}
    info.setdefault("command", _reproducing_command(info["training_config"]))
    weights = {k: v.detach().cpu().contiguous().clone() for k, v in state["model_state"].items()}

    with atomic_directory(target, owned=is_model_dir, what="an mbdl model directory") as staging:
        save_file(weights, str(staging / WEIGHTS_FILE), metadata={"format": MODEL_FORMAT})
        os.chmod(staging / WEIGHTS_FILE, default_file_mode())
        atomic_write_text(staging / CONFIG_FILE, json.dumps(info, indent=2) + "\n")
        atomic_write_text(
            staging / PREPROCESSING_FILE, json.dumps(info["preprocessing"], indent=2) + "\n"
        )
        atomic_write_text(staging / CARD_FILE, model_card(info))
    return target


# ---------------------------------------------------------------------------------------------
# ONNX and TorchScript


def _export_onnx(model: nn.Module, example: Tensor, path: Path) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise missing_extra("onnx and onnxscript", "export") from None
    import contextlib
    import io

    batch = torch.export.Dim("batch", min=1, max=2**20)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            input_names=["images"],
            output_names=["embeddings"],
            dynamic_shapes={"images": {0: batch}},
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    if program is None:  # pragma: no cover (the dynamo exporter returns the program)
        raise RuntimeError("torch.onnx.export returned no program")
    program.save(str(path))


def _export_torchscript(model: nn.Module, example: Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, check_trace=False)
    buffer = io.BytesIO()  # serialised in memory: torch's file writer aborts on a full disk
    torch.jit.save(traced, buffer)
    with open(path, "wb") as file:
        file.write(buffer.getbuffer())
        file.flush()
        os.fsync(file.fileno())


def onnx_runner(
    path: str | os.PathLike[str], threads: int | None = None
) -> Callable[[Tensor], Tensor]:
    """A function running the ONNX file ``path`` with ONNX Runtime on CPU (``threads``: its
    intra-op threads; None: ONNX Runtime's default)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise missing_extra("onnxruntime", "export") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(images: Tensor) -> Tensor:
        (output,) = session.run(["embeddings"], {"images": images.numpy()})
        return torch.from_numpy(output)

    return run


def torchscript_runner(path: str | os.PathLike[str]) -> Callable[[Tensor], Tensor]:
    """A function running the TorchScript file ``path`` on CPU."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(images: Tensor) -> Tensor:
        with torch.inference_mode():
            return module(images).float()

    return run


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """Where the preprocessing JSON of an exported file goes: ``<file name>.json``."""
    target = Path(path)
    return target.with_name(target.name + ".json")


def export_file(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    fmt: Format,
    images: Tensor,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
) -> dict[str, Any]:
    """Export the embedder of ``source`` to ``output`` and check it against PyTorch.

    ``images`` (preprocessed, ``[N, C, H, W]``, at least 2) are embedded by PyTorch and by the
    exported file (ONNX Runtime or TorchScript), in one batch of ``N`` and one of ``N - 1`` (the
    batch axis is dynamic); above ``tolerance`` the export is refused and nothing is written.
    ``safetensors`` writes a model directory (:func:`save_pretrained`) and checks it by loading
    it back. Next to an ONNX / TorchScript file, ``<file name>.json`` (:func:`sidecar_path`) holds
    the preprocessing.

    Returns ``{"format", "path", "export_s", "bytes", "max_abs_diff", "images"}``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if images.ndim != 4 or images.shape[0] < 2:
        raise ValueError(f"need at least 2 check images [N, C, H, W], got {tuple(images.shape)}")
    state = load_state(source)
    record = state_record(state, str(source))
    model = model_from_state(state, "cpu")
    with torch.inference_mode():
        expected = model(images).float()
    target = Path(output)

    def max_diff(runs: list[Tensor]) -> float:
        """The largest difference to PyTorch; refuses the export above ``tolerance``."""
        diff = max(float((run - ref).abs().max()) for run, ref in zip(runs, refs, strict=True))
        if not diff <= tolerance:
            raise ValueError(
                f"the {fmt} export differs from PyTorch by {diff:.3g} (tolerance {tolerance:g}) "
                f"on {len(images)} real images; export refused"
            )
        return diff

    refs = [expected, expected[1:]]  # one full batch and one smaller: the batch axis is dynamic
    start = time.perf_counter()
    if fmt == "safetensors":
        save_pretrained(source, target)
        seconds = time.perf_counter() - start
        loaded, _ = load_embedder(target)
        with torch.inference_mode():
            diff = max_diff([loaded(images).float(), loaded(images[1:]).float()])
        size = sum(p.stat().st_size for p in target.iterdir() if p.is_file())
    else:
        if target.is_dir():
            raise ValueError(f"-o {str(target)!r} is a directory; give a file name")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(target)
            temp = temp_sibling(target)
        except Exception as error:
            raise naming(error, target) from None
        try:
            export = _export_onnx if fmt == "onnx" else _export_torchscript
            export(model, images[:2].clone(), temp)
            seconds = time.perf_counter() - start
            runner = (onnx_runner if fmt == "onnx" else torchscript_runner)(temp)
            diff = max_diff([runner(images), runner(images[1:].contiguous())])
            os.chmod(temp, default_file_mode())
            os.replace(temp, target)
        except BaseException as error:
            mapped = naming(error, target)  # before the unlink frees the space it judges by
            temp.unlink(missing_ok=True)
            raise mapped from None
        size = target.stat().st_size
    result = {
        "format": fmt,
        "path": str(target),
        "export_s": seconds,
        "bytes": size,
        "max_abs_diff": diff,
        "images": len(images),
    }
    if fmt != "safetensors":
        sidecar = {
            "format": fmt,
            "input": "images",
            "output": "embeddings",
            "embedding_dim": int(expected.shape[1]),
            "distance": record.distance,
            "preprocessing": dict(record.preprocessing),
            "verification": record.stored_fields()["verification"],
            "check": {"max_abs_diff": diff, "tolerance": tolerance, "images": len(images)},
        }
        atomic_write_text(sidecar_path(target), json.dumps(sidecar, indent=2) + "\n")
    return result


def check_images(
    state_or_path: dict[str, Any] | str | os.PathLike[str],
    paths: Sequence[str | os.PathLike[str]] | None = None,
    *,
    count: int = 16,
) -> Tensor:
    """Preprocessed real images to check an export with: the given image files, else the first
    ``count`` images of the model's test split (its training data)."""
    from mbdl.data.files import ImageReadError, read_image

    state = state_or_path if isinstance(state_or_path, dict) else load_state(state_or_path)
    record = state_record(state)
    transform = transform_from_spec(dict(record.preprocessing))
    if paths:
        tensors = []
        for path in paths:
            try:  # the one checked reader: 16-bit, alpha, size bounds, as every command
                tensors.append(transform(read_image(Path(path), record.color_mode)))
            except ImageReadError as error:
                raise ValueError(f"cannot read check image: {error}") from None
    else:
        from mbdl.config import config_from_flat, stored_config_values
        from mbdl.runconfig import load_data

        config = dict(record.provenance.training_config)
        if not config:
            raise ValueError("this model records no training data; give check images (--images)")
        flat = stored_config_values(config, "checkpoint config")
        flat["resume"] = False
        try:
            test = load_data(config_from_flat(flat)).test
        except (ValueError, OSError) as error:
            raise ValueError(
                f"cannot load the model's test images to check the export ({error}); give check "
                "images with --images"
            ) from None
        tensors = [transform(test.load_image(i)) for i in range(min(count, len(test)))]
    if len(tensors) < 2:
        raise ValueError(f"need at least 2 check images, got {len(tensors)}")
    return torch.stack(tensors)


__all__ = [
    "CARD_FILE",
    "CONFIG_FILE",
    "FORMATS",
    "HUB_PREFIX",
    "MODEL_FORMAT",
    "MODEL_VERSION",
    "PREPROCESSING_FILE",
    "WEIGHTS_FILE",
    "MissingExtra",
    "check_images",
    "export_file",
    "hub_download",
    "is_model_dir",
    "load_embedder",
    "load_state",
    "missing_extra",
    "model_card",
    "onnx_runner",
    "preprocessing_spec",
    "push_to_hub",
    "save_pretrained",
    "state_preprocessing",
    "torchscript_runner",
    "transform_from_spec",
]
