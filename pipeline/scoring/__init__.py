"""Scoring a model: `metrics` (binary metrics and plots; the one metric-name scheme), `score` (shards
through the loaders, folders through `pipeline.data.folders`), `robustness` (the degradation sweep),
`cli` (the flags evaluate and predict share)."""
