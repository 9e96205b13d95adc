# Triton Python backend entry point; the implementation lives in the installed triton_models package.
from triton_models.echo import TritonPythonModel

__all__ = ["TritonPythonModel"]
