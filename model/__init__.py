"""DeepfakeNet: the detector model. Imports nothing from pipeline/ or shard_tools/.

``create_model(name, **kwargs)`` builds a named variant (``list_models()``); every variant takes
float NCHW RGB of side >= ``MIN_IMAGE_SIZE`` and returns logits ``[N, 1]``. ``validate_kwargs``
checks a variant's keyword arguments against the bounds in `model.bounds` without building it.
"""
from model.bounds import INPUT_FILTERS, MAX_IMAGE_SIZE, MAX_PARAMS, MIN_IMAGE_SIZE
from model.deepfakenet import (
    Bottleneck,
    DeepfakeNet,
    NPRFilter,
    count_macs,
    count_params,
    create_model,
    default_cfgs,
    input_size,
    list_models,
    validate_kwargs,
)

__all__ = [
    "INPUT_FILTERS", "MAX_IMAGE_SIZE", "MAX_PARAMS", "MIN_IMAGE_SIZE", "Bottleneck", "DeepfakeNet", "NPRFilter",
    "count_macs", "count_params", "create_model", "default_cfgs", "input_size", "list_models", "validate_kwargs",
]
