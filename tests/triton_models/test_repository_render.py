"""Rendering the model repository: every config valid for Triton, the two generation models interchangeable."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from build_engines.cli import main as build_engines_main
from build_engines.repository import RenderError, RepositorySettings, render_config, render_repository
from build_engines.tiny_checkpoints import TokenizerStyle
from model_repository import TEMPLATE_DIR
from triton_models import tensors as t


def _parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture
def checkpoint(tiny_checkpoints: dict[TokenizerStyle, Path]) -> Path:
    return tiny_checkpoints[TokenizerStyle.BYTE_BPE]


def test_cpu_repository_configs_parse_with_tritons_schema(checkpoint: Path, tmp_path: Path) -> None:
    repo = render_repository(RepositorySettings(checkpoint_dir=str(checkpoint)), tmp_path / "repo")
    assert sorted(p.name for p in repo.iterdir()) == sorted([t.PREPROCESSING, t.CPU_LLM, t.POSTPROCESSING, t.ENSEMBLE])
    for model in repo.iterdir():
        config = _parse(model / "config.pbtxt")
        assert config.name == model.name
        assert "${" not in (model / "config.pbtxt").read_text()
    cpu = _parse(repo / t.CPU_LLM / "config.pbtxt")
    assert cpu.model_transaction_policy.decoupled
    assert cpu.parameters["checkpoint_dir"].string_value == str(checkpoint)
    assert (repo / t.CPU_LLM / "1" / "model.py").is_file()


def test_tensorrt_llm_repository_configs_parse_with_tritons_schema(checkpoint: Path, tmp_path: Path) -> None:
    settings = RepositorySettings(
        checkpoint_dir=str(checkpoint), generation_model=t.TENSORRT_LLM, engine_dir="/engines/llama/h100-fp8"
    )
    repo = render_repository(settings, tmp_path / "repo")
    trt = _parse(repo / t.TENSORRT_LLM / "config.pbtxt")
    assert trt.backend == "tensorrtllm"
    assert trt.model_transaction_policy.decoupled
    assert trt.parameters["gpt_model_path"].string_value == "/engines/llama/h100-fp8"
    assert trt.parameters["gpt_model_type"].string_value == "inflight_fused_batching"
    ensemble = _parse(repo / t.ENSEMBLE / "config.pbtxt")
    assert [step.model_name for step in ensemble.ensemble_scheduling.step] == [
        t.PREPROCESSING,
        t.TENSORRT_LLM,
        t.POSTPROCESSING,
    ]


def test_cpu_llm_has_exactly_the_tensor_interface_of_tensorrt_llm() -> None:
    def interface(model: str) -> tuple[list[tuple[str, int, list[int], bool]], list[tuple[str, int, list[int]]]]:
        text = (TEMPLATE_DIR / model / "config.pbtxt").read_text().replace("${triton_max_batch_size}", "64")
        text = text.replace("${decoupled_mode}", "true").replace("${lora_weights_data_type}", "TYPE_FP16")
        config = text_format.Parse(
            "\n".join(line for line in text.splitlines() if "${" not in line), model_config_pb2.ModelConfig()
        )
        inputs = [(i.name, i.data_type, list(i.dims), i.optional) for i in config.input]
        outputs = [(o.name, o.data_type, list(o.dims)) for o in config.output]
        return inputs, outputs

    assert interface(t.CPU_LLM) == interface(t.TENSORRT_LLM) == interface(t.ECHO_LLM)
    # The sampling inputs renamed between releases carry the pinned container's names (triton_models/tensors.py).
    assert {t.GEN_MIN_TOKENS, t.GEN_SEED} <= {name for name, *_ in interface(t.TENSORRT_LLM)[0]}


def test_ensemble_speaks_the_names_clients_of_nvidias_ensemble_use() -> None:
    text = (TEMPLATE_DIR / t.ENSEMBLE / "config.pbtxt").read_text()
    # Without the image path (lines that are one template variable: vision-language checkpoints only).
    text = "\n".join(line for line in text.splitlines() if not line.strip().startswith("${"))
    config = text_format.Parse(
        text.replace("${triton_max_batch_size}", "64")
        .replace("${generation_model}", t.CPU_LLM)
        .replace("${lora_weights_data_type}", "TYPE_FP16"),
        model_config_pb2.ModelConfig(),
    )
    names = {i.name for i in config.input}
    assert names == {
        t.TEXT_INPUT, t.MAX_TOKENS, t.STREAM, t.TEMPERATURE, t.TOP_K, t.TOP_P, t.PRESENCE_PENALTY,
        t.FREQUENCY_PENALTY, t.REPETITION_PENALTY, t.MIN_TOKENS, t.SEED, t.STOP_WORDS, t.BAD_WORDS, t.END_ID,
        t.PAD_ID, t.RETURN_LOG_PROBS, t.LORA_TASK_ID, t.LORA_WEIGHTS, t.LORA_CONFIG,
    }  # fmt: skip
    assert {o.name for o in config.output} == {
        t.TEXT_OUTPUT,
        t.TEXT_BYTES_OUTPUT,
        t.OUTPUT_TOKEN_COUNT,
        t.CUM_LOG_PROBS,
        t.OUTPUT_LOG_PROBS,
    }


def test_unfilled_or_invalid_templates_are_refused() -> None:
    with pytest.raises(RenderError, match="no value for template variable 'engine_dir'"):
        render_config('name: "x" parameters { key: "a" value: { string_value: "${engine_dir}" } }', {}, "x")
    with pytest.raises(RenderError, match="not a valid Triton model config"):
        render_config("name: x max_batch_size: many", {}, "x")
    with pytest.raises(RenderError, match="unfilled"):
        render_config('name: "$${kept}"', {}, "x")


def test_tensorrt_llm_without_engine_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    settings = RepositorySettings(checkpoint_dir=str(checkpoint), generation_model=t.TENSORRT_LLM)
    with pytest.raises(RenderError, match="engine directory"):
        render_repository(settings, tmp_path / "repo")


def test_cli_renders_the_cpu_repository(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "repo"
    assert (
        build_engines_main(["repository", "--checkpoint", str(checkpoint), "--target", "cpu", "--out", str(out)]) == 0
    )
    assert _parse(out / t.ENSEMBLE / "config.pbtxt").platform == "ensemble"
    assert build_engines_main(["repository", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x")]) == 1
