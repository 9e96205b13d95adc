# Triton Python backend entry point; the implementation lives in the installed triton_models package.
from triton_models.multimodal_encoders import TritonPythonModel

__all__ = ["TritonPythonModel"]
