"""DeepfakeNet: the detector model. Imports nothing from pipeline/ or shard_tools/.

``create_model(name, **kwargs)`` builds a named variant (``list_models()``); every variant takes
float NCHW RGB of side >= ``MIN_IMAGE_SIZE`` and returns logits ``[N, 1]``.
"""
from model.deepfakenet import (
    MIN_IMAGE_SIZE,
    Bottleneck,
    DeepfakeNet,
    count_params,
    create_model,
    default_cfgs,
    input_size,
    list_models,
)

__all__ = [
    "MIN_IMAGE_SIZE", "Bottleneck", "DeepfakeNet", "count_params", "create_model", "default_cfgs",
    "input_size", "list_models",
]
