"""What a trained model is: the records that travel with its weights."""

from mbdl.model.preprocessing import preprocessing_spec, transform_from_spec

__all__ = ["preprocessing_spec", "transform_from_spec"]
