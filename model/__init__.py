"""DeepfakeNet: the detector model. Imports nothing from pipeline/ or shard_tools/."""
