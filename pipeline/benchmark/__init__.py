"""The loader benchmark behind `deepfake-bench`: `harness` (process-tree monitor, timed windows),
`runner` (one fresh process per row), `report` (ratios, table, plot), `rows` (the row table and the
row functions)."""
