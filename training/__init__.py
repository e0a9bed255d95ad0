"""network3's training half: data, model, presets, trainer, evaluation, ONNX export."""
from serving import __version__  # one version for the one distribution

__all__ = ["__version__"]
