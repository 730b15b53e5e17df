"""Shards to device batches: manifest -> shard list (`shards`), the tar reader, the loader contract
(`contract`), `loader.build_loader` and its two backends (`torch_backend`, `dali_backend` +
`dali_graph`), image files and folders read directly (`folders`), synthetic sample data (`synthetic`)."""
