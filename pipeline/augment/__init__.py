"""The one augmentation spec and its implementations: `config` (AugConfig, presets, normalisation
constants), `params` (per-sample draws and affine maths, device-free), `batch_ops` (torch tensors,
on the GPU), `uint8_ops` (OpenCV, per sample in CPU workers), `degrade` (the robustness degradations)."""
