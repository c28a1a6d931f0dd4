"""Warm start: a run that starts from a trained mbdl embedder (``model.init=RUN|MODEL_DIR|
hf://owner/name``), its backbone and head, read through :func:`mbdl.export.load_state` (the
trust boundary of received files applies).

The new run's architecture must be the stored one (backbone, embedding size, input channels,
head BatchNorm); anything else is refused in one line before training. The stored model's
preprocessing (mean, std, interpolation, crop fraction) is the new run's too, unless the
``data.*`` keys say otherwise (:func:`init_statistics`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mbdl.errors import UserError
from mbdl.model.preprocessing import ImageStatistics

#: model_args that must agree between the stored model and the new run
MATCHING = ("backbone", "embedding_dim", "in_channels", "head_bn", "normalize")


class WarmStartError(UserError):
    """A ``model.init`` that cannot start this run."""


def _load(path: str) -> dict[str, Any]:
    from mbdl.model.loading import load_state

    try:
        return load_state(path)
    except UserError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise WarmStartError(f"model.init={path}: cannot load a trained model ({first})") from None


def init_statistics(path: str) -> ImageStatistics:
    """The preprocessing values the model at ``path`` was trained with."""
    from mbdl.model.loading import state_preprocessing

    spec = state_preprocessing(_load(path))
    return ImageStatistics(
        tuple(spec["mean"]),
        tuple(spec["std"]),
        interpolation=str(spec.get("interpolation", "bilinear")),
        crop_fraction=min(1.0, int(spec["crop"]) / int(spec["resize"])),
        origin=f"model.init {path}",
    )


def warm_start(model: nn.Module, path: str) -> None:
    """Load the trained embedder at ``path`` into ``model`` (an
    :class:`mbdl.models.EmbeddingModel`), refusing an incompatible one in one line."""
    state = _load(path)
    stored = state.get("model_args") or {}
    own = getattr(model, "build_args", {})
    different = [
        f"{key} {stored.get(key)!r} (this run: {own.get(key)!r})"
        for key in MATCHING
        if key in own and stored.get(key, own[key]) != own[key]
    ]
    if different:
        raise WarmStartError(
            f"model.init={path} does not fit this run: its {'; '.join(different)}; set the "
            "model.* keys to the stored model's"
        )
    weights = state.get("model_state")
    expected = model.state_dict()
    if not isinstance(weights, dict) or set(weights) != set(expected):
        raise WarmStartError(f"model.init={path}: its weights do not fit this run's model")
    wrong = [k for k in expected if tuple(weights[k].shape) != tuple(expected[k].shape)]
    if wrong:
        raise WarmStartError(
            f"model.init={path}: shape mismatch for {wrong[0]}: "
            f"{tuple(weights[wrong[0]].shape)} vs {tuple(expected[wrong[0]].shape)}"
        )
    model.load_state_dict(weights)
