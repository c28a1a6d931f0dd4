"""The one typed record of a trained model, read from a checkpoint or a model directory.

A :class:`ModelRecord` is what travels with the weights: the architecture (``model_args``, for
:func:`mbdl.models.build_model`), the data it was trained on (``data_args``), the preprocessing
an image needs (:func:`mbdl.model.preprocessing.preprocessing_spec`), the distance its embeddings
are compared with, the verification threshold chosen on the validation classes, and where it came
from (mbdl version, training config, metrics, the path it was loaded from).

Checkpoints and model directories store it as top-level fields (``model_args``, ``data_args``,
``preprocessing``, ``distance``, ``verification``, ``mbdl_version``, ...); checkpoints of version 1
lack the last three, which are derived here exactly as mbdl derived them then. Every field is
checked when read (:func:`record_from_fields`): a damaged or hostile file is refused with one
line naming the file and the field, before anything is built from it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mbdl.config import UPPER_BOUNDS
from mbdl.errors import UserError, terminal_safe

#: the image size of a record that states none (checkpoints of the first mbdl versions)
DEFAULT_IMAGE_SIZE = 32
#: the keys ``model_args`` may hold
MODEL_ARG_KEYS = frozenset(
    {"backbone", "embedding_dim", "in_channels", "freeze_bn", "head_bn", "normalize"}
)
#: bounds on the stored fields that size allocations (inclusive)
LIMITS = {
    "embedding_dim": int(UPPER_BOUNDS["model.embedding_dim"]),
    "image_size": int(UPPER_BOUNDS["data.image_size"]),
    # the shorter side before the centre crop: at most the crop scaled by 256 / 224, twice over
    "resize": 2 * int(UPPER_BOUNDS["data.image_size"]),
}
#: the distances a record may name (:data:`mbdl.functional.distances.DISTANCES`)
DISTANCES = ("euclidean", "squared_euclidean", "cosine")


def imagenet_normalised(pretrained: object) -> bool:
    """The normalisation rule: ImageNet mean and std when the backbone starts from pretrained
    weights (``model.pretrained`` set), none (mean 0, std 1) when it is trained from scratch."""
    return pretrained is not None


def evaluation_preprocessing(image_size: int, channels: int, pretrained: object) -> dict[str, Any]:
    """The evaluation preprocessing of a model trained at ``image_size`` on ``channels``
    channels, with or without ``pretrained`` weights: the one place this is worked out."""
    from mbdl.model.preprocessing import preprocessing_spec

    return preprocessing_spec(image_size, channels, imagenet_norm=imagenet_normalised(pretrained))


def config_value(config: Mapping[str, Any] | None, section: str, key: str) -> Any:
    """``config[section][key]`` of a stored config in nested or flat dotted form, else None."""
    if not isinstance(config, Mapping):
        return None
    nested = config.get(section)
    if isinstance(nested, Mapping) and key in nested:
        return nested[key]
    return config.get(f"{section}.{key}")


# ---------------------------------------------------------------------------------------------
# the record


@dataclass(frozen=True)
class VerificationRecord:
    """The distance threshold chosen on the validation classes: pairs at most ``threshold``
    apart are called the same item, at false accept rate ``far`` on those classes."""

    threshold: float
    distance: str | None
    far: float | None
    fields: Mapping[str, Any] = field(default_factory=dict)  # everything stored, for writing back

    def threshold_for(self, distance: str) -> float:
        """The threshold in ``distance``; a squared-euclidean threshold converts to euclidean
        (the same decisions), any other mismatch is a :class:`UserError`."""
        if self.distance in (None, distance):
            return self.threshold
        if self.distance == "squared_euclidean" and distance == "euclidean":
            return math.sqrt(self.threshold)
        raise UserError(
            f"the stored threshold is a {self.distance} distance but the distance used is "
            f"{distance}: drop the eval.distance override or give --threshold DISTANCE"
        )

    def to_dict(self) -> dict[str, Any]:
        return dict(self.fields)


@dataclass(frozen=True)
class Provenance:
    """Where a model came from: the mbdl that wrote it, the run's config (canonical nested form
    once loaded), its metrics, and the path it was loaded from."""

    mbdl_version: str | None = None
    training_config: Mapping[str, Any] = field(default_factory=dict)
    validation: Mapping[str, Any] = field(default_factory=dict)
    test: Mapping[str, Any] = field(default_factory=dict)
    source: str | None = None
    command: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class ModelRecord:
    """What a trained model is, apart from its weights (see the module docstring)."""

    model_args: Mapping[str, Any]
    data_args: Mapping[str, Any]
    preprocessing: Mapping[str, Any]
    distance: str
    verification: VerificationRecord | None
    provenance: Provenance

    @property
    def backbone(self) -> str:
        return str(self.model_args["backbone"])

    @property
    def embedding_dim(self) -> int:
        return int(self.model_args["embedding_dim"])

    @property
    def in_channels(self) -> int:
        return int(self.model_args["in_channels"])

    @property
    def image_size(self) -> int:
        return int(self.preprocessing["crop"])

    @property
    def color_mode(self) -> str:
        return str(self.preprocessing["color_mode"])

    def stored_fields(self) -> dict[str, Any]:
        """The fields a checkpoint or model directory stores for this record (beside the
        weights, the config and the metrics)."""
        return {
            "model_args": dict(self.model_args),
            "data_args": dict(self.data_args),
            "preprocessing": dict(self.preprocessing),
            "distance": self.distance,
            "verification": None if self.verification is None else self.verification.to_dict(),
            "mbdl_version": self.provenance.mbdl_version,
        }


# ---------------------------------------------------------------------------------------------
# reading and checking the stored fields


def _fail(where: str, message: str) -> UserError:
    return UserError(f"{terminal_safe(where)}: {message}; the file is damaged or not from mbdl")


def _type_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, type):
        return kind.__name__
    return " or ".join(_type_name(k) for k in kind)


def _typed(value: Any, kind: type | tuple[type, ...], name: str, where: str) -> Any:
    wrong_bool = isinstance(value, bool) and kind in (int, float, (int, float))
    accepted = Mapping if kind is dict else kind
    if not isinstance(value, accepted) or wrong_bool:
        raise _fail(where, f"field {name!r} must be {_type_name(kind)}, got {type(value).__name__}")
    return value


def _integer(value: Any, name: str, where: str, low: int, high: int) -> int:
    _typed(value, int, name, where)
    if not low <= value <= high:
        raise _fail(where, f"{name} {value} is outside {low}..{high}")
    return int(value)


def _finite(
    value: Any, name: str, where: str, *, positive: bool = False, signed: bool = False
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(where, f"{name} must be a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise _fail(where, f"{name} must be finite, got {number}")
    if (number < 0 and not signed) or (positive and number <= 0):
        raise _fail(where, f"{name} must be {'> 0' if positive else '>= 0'}, got {number:g}")
    return number


def check_model_args(args: Any, where: str) -> dict[str, Any]:
    """``model_args``: a known backbone, embedding size and channels within :data:`LIMITS`,
    boolean flags, no unknown keys."""
    from mbdl.models import BACKBONES

    args = dict(_typed(args, dict, "model_args", where))
    backbone = _typed(args.get("backbone"), str, "model_args.backbone", where)
    if backbone not in BACKBONES:
        raise UserError(
            f"{terminal_safe(where)}: unknown backbone {terminal_safe(backbone)[:100]!r} "
            f"(this mbdl has {BACKBONES.describe_choices()})"
        )
    _integer(
        args.get("embedding_dim"), "model_args.embedding_dim", where, 1, LIMITS["embedding_dim"]
    )
    if _typed(args.get("in_channels"), int, "model_args.in_channels", where) not in (1, 3):
        raise _fail(where, f"model_args in_channels must be 1 or 3, got {args['in_channels']}")
    for flag in ("freeze_bn", "head_bn", "normalize"):
        if flag in args:
            _typed(args[flag], bool, f"model_args.{flag}", where)
    unknown = sorted(str(k) for k in set(args) - MODEL_ARG_KEYS)
    if unknown:
        raise _fail(where, f"unknown model_args {[terminal_safe(k)[:40] for k in unknown[:3]]}")
    return args


def check_data_args(data: Any, channels: int | None, where: str) -> dict[str, Any]:
    """``data_args``: an image size within :data:`LIMITS`, channels agreeing with the model."""
    data = dict(_typed(data, dict, "data_args", where))
    if "image_size" in data:
        _integer(data["image_size"], "data_args.image_size", where, 1, LIMITS["image_size"])
    if "channels" in data:
        stored = _typed(data["channels"], int, "data_args.channels", where)
        if channels is not None and stored != channels:
            raise _fail(where, f"data_args channels {stored} disagrees with the model's {channels}")
    for key in ("source", "root"):
        if data.get(key) is not None:
            _typed(data[key], str, f"data_args.{key}", where)
    return data


def check_preprocessing(spec: Any, channels: int | None, where: str) -> dict[str, Any]:
    """A stored preprocessing spec: crop and resize within :data:`LIMITS`, a colour mode and
    finite means and positive finite stds matching the model's channels."""
    spec = dict(_typed(spec, dict, "preprocessing", where))
    for key in ("crop", "resize", "color_mode", "mean", "std"):
        if key not in spec:
            raise _fail(where, f"preprocessing has no {key!r}")
    crop = _integer(spec["crop"], "preprocessing.crop", where, 1, LIMITS["image_size"])
    resize = _integer(spec["resize"], "preprocessing.resize", where, 1, LIMITS["resize"])
    if resize < crop:
        raise _fail(where, f"preprocessing resize {resize} is smaller than its crop {crop}")
    if "image_size" in spec:
        _integer(spec["image_size"], "preprocessing.image_size", where, 1, LIMITS["image_size"])
    mode = spec["color_mode"]
    if mode not in ("RGB", "L"):
        raise _fail(where, f"preprocessing color_mode must be 'RGB' or 'L', got {mode!r:.40}")
    mode_channels = 3 if mode == "RGB" else 1
    if channels is not None and mode_channels != channels:
        raise _fail(
            where, f"preprocessing color_mode {mode} disagrees with the model's {channels} channels"
        )
    if "channels" in spec and spec["channels"] != mode_channels:
        raise _fail(where, f"preprocessing channels disagree with its color_mode {mode}")
    for key in ("mean", "std"):
        values = _typed(spec[key], list, f"preprocessing.{key}", where)
        if len(values) != mode_channels:
            raise _fail(
                where, f"preprocessing {key} has {len(values)} values for {mode_channels} channels"
            )
        for value in values:
            _finite(
                value, f"preprocessing.{key}", where, positive=key == "std", signed=key == "mean"
            )
    if "scale" in spec:
        _finite(spec["scale"], "preprocessing.scale", where, positive=True)
    if "crop_fraction" in spec:
        fraction = _finite(
            spec["crop_fraction"], "preprocessing.crop_fraction", where, positive=True
        )
        if fraction > 1:
            raise _fail(where, f"preprocessing crop_fraction must be in (0, 1], got {fraction:g}")
    if "interpolation" in spec:
        _typed(spec["interpolation"], str, "preprocessing.interpolation", where)
    return spec


def check_distance(value: Any, name: str, where: str) -> str:
    if value not in DISTANCES:
        raise _fail(where, f"{name} must be one of {', '.join(DISTANCES)}, got {value!r:.60}")
    return str(value)


def check_verification(value: Any, where: str) -> VerificationRecord | None:
    """A stored verification threshold: finite and >= 0, its distance and FAR valid."""
    if value is None:
        return None
    stored = dict(_typed(value, dict, "verification", where))
    if "threshold" not in stored:
        raise _fail(where, "verification has no threshold")
    threshold = _finite(stored["threshold"], "verification.threshold", where)
    distance = stored.get("distance")
    if distance is not None:
        check_distance(distance, "verification.distance", where)
    far = stored.get("far")
    if far is not None:
        far = _finite(far, "verification.far", where)
        if far > 1:
            raise _fail(where, f"verification far must be in [0, 1], got {far:g}")
    return VerificationRecord(threshold, distance, far, stored)


def _metrics(value: Any, name: str, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    return dict(_typed(value, dict, name, where))


def record_from_fields(
    fields: Mapping[str, Any], where: str, *, source: str | None = None
) -> ModelRecord:
    """The :class:`ModelRecord` of a checkpoint's or model directory's fields, every one
    checked (:class:`UserError` naming ``where`` and the field otherwise). Fields a version-1
    checkpoint lacks (``preprocessing``, ``distance``, ``mbdl_version``) are derived as mbdl
    derived them then."""
    if "model_args" not in fields:
        raise _fail(where, "no model_args (the architecture)")
    model_args = check_model_args(fields["model_args"], where)
    channels = int(model_args["in_channels"])
    data_args = check_data_args(fields.get("data_args") or {}, channels, where)
    config = fields.get("config")
    if config is None:
        config = fields.get("training_config")
    config = _metrics(config, "config", where)
    if fields.get("preprocessing") is not None:
        preprocessing = check_preprocessing(fields["preprocessing"], channels, where)
    else:
        size = int(data_args.get("image_size", DEFAULT_IMAGE_SIZE))
        pretrained = config_value(config, "model", "pretrained")
        preprocessing = evaluation_preprocessing(size, channels, pretrained)
    if fields.get("distance") is not None:
        distance = check_distance(fields["distance"], "distance", where)
    else:
        stored = config_value(config, "eval", "distance")
        distance = check_distance(stored or "euclidean", "eval.distance", where)
    version = fields.get("mbdl_version")
    if version is not None:
        version = terminal_safe(_typed(version, str, "mbdl_version", where))[:40]
    command = fields.get("command")
    name = fields.get("name")
    provenance = Provenance(
        mbdl_version=version,
        training_config=config,
        validation=_metrics(fields.get("validation"), "validation", where),
        test=_metrics(fields.get("test"), "test", where),
        source=source,
        command=command if isinstance(command, str) else None,
        name=name if isinstance(name, str) else None,
    )
    return ModelRecord(
        model_args=model_args,
        data_args=data_args,
        preprocessing=preprocessing,
        distance=distance,
        verification=check_verification(fields.get("verification"), where),
        provenance=provenance,
    )


def read_record(state_or_path: Any, *, source: str | None = None) -> ModelRecord:
    """The :class:`ModelRecord` of a loaded state (:func:`mbdl.model.load_state`) or of a path
    (a model directory, ``hf://`` repository, run directory or checkpoint)."""
    if isinstance(state_or_path, Mapping):
        where = source or "the checkpoint"
        return record_from_fields(state_or_path, where, source=source)
    from mbdl.model.loading import load_state

    state = load_state(state_or_path)
    return record_from_fields(state, str(state_or_path), source=str(state_or_path))


__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "DISTANCES",
    "LIMITS",
    "MODEL_ARG_KEYS",
    "ModelRecord",
    "Provenance",
    "VerificationRecord",
    "check_data_args",
    "check_model_args",
    "check_preprocessing",
    "check_verification",
    "config_value",
    "evaluation_preprocessing",
    "imagenet_normalised",
    "read_record",
    "record_from_fields",
]
