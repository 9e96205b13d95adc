"""Templates of the Triton model repository (not a repository Triton can load as is).

`python -m build_engines repository` renders a concrete repository from these: it fills the `${...}`
variables of each `config.pbtxt` and copies the Python models. Layout as NVIDIA's TensorRT-LLM backend
(`inflight_batcher_llm`): preprocessing → tensorrt_llm (GPU) or cpu_llm (CPU) → postprocessing, wired
by `ensemble`.
"""

from pathlib import Path

TEMPLATE_DIR = Path(__file__).resolve().parent
