"""DeepfakeNet: the detector model. Imports nothing from pipeline/ or shard_tools/.

``create_model(name, **kwargs)`` builds a named variant (``list_models()``) or any timm architecture
as ``timm/NAME`` (`model.timm_backbone`); every model takes float NCHW RGB of side >= ``MIN_IMAGE_SIZE``
and returns logits ``[N, 1]``. ``validate_kwargs`` checks a model's keyword arguments (a variant's
against the bounds in `model.bounds`) without building it. `model.pretrained` loads ImageNet weights.
"""
from model.bounds import INPUT_FILTERS, MAX_IMAGE_SIZE, MAX_PARAMS, MIN_IMAGE_SIZE
from model.deepfakenet import (
    Bottleneck,
    DeepfakeNet,
    NPRFilter,
    count_macs,
    count_params,
    default_cfgs,
    input_size,
    list_models,
)
from model.factory import create_model, head_prefixes, validate_kwargs
from model.timm_backbone import TimmDetector, is_timm

__all__ = [
    "INPUT_FILTERS", "MAX_IMAGE_SIZE", "MAX_PARAMS", "MIN_IMAGE_SIZE", "Bottleneck", "DeepfakeNet", "NPRFilter",
    "count_macs", "count_params", "create_model", "default_cfgs", "head_prefixes", "input_size", "is_timm", "list_models",
    "TimmDetector", "validate_kwargs",
]
