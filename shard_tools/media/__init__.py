"""The face stage: photos and videos in, square face crops out (pack, deepfake-faces, evaluate, predict).

``probe`` tells a photo from a video by content; ``video`` samples frames (sequential decode, exact
indices and times); ``detect`` finds faces with an offline detector; ``crop`` cuts the square crop;
``stage`` runs the whole thing for one file under `FaceSettings`; ``groups`` decides which files must share a
split. Everything here is plain numpy/OpenCV/PyAV: no torch, so the packer's workers stay light.
"""
