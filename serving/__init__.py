"""network3's serving half: ONNX model, batcher, gRPC services, client. No torch here."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("network3")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
