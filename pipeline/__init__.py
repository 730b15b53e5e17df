"""Training, evaluation and benchmarking of deepfake detectors on `shard_tools` shards.

Sub-packages, each one concern (imports run one way, top to bottom; `tests/test_layout.py` checks it):

* entry points ``train``, ``evaluate``, ``predict``, ``export``, ``bench``, ``demo``: a parser and a ``main``;
* `pipeline.training`, `pipeline.scoring`, `pipeline.benchmark`: what the entry points run;
* `pipeline.data`, `pipeline.augment`, `pipeline.checkpoint`: shards to device batches, the one
  augmentation spec, weights on disk;
* `model`, `shard_tools`: the network and the shard format, which import nothing from here.
"""
