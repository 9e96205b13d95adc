"""`python -m build_engines build`: plans per target, dry-run repositories, refusals before any step runs."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from build_engines.build import GPU_PREPROCESSING_INSTANCES, MANIFEST_FILE, REGISTRY_ENTRY_FILE, build
from build_engines.cli import main as build_engines_main
from build_engines.targets import TARGETS_FILE, TargetCatalog, TargetError, load_targets
from build_engines.tiny_checkpoints import TokenizerStyle, write_tiny_checkpoint
from cpu_engine import CheckpointError
from gateway.settings import GatewaySettings
from tests.triton_client import StreamingClient
from triton_models import tensors as t
from triton_models.launcher import EmbeddedTriton
from triton_models.serve import server_command, world_size

CATALOG = load_targets()
GPU_TARGETS = sorted(name for name, target in CATALOG.targets.items() if target.is_gpu)


@pytest.fixture(scope="module")
def tiny_long_context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint whose context is as long as the GPU targets' sequences (8192)."""
    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny-8k") / "ck", TokenizerStyle.BYTE_BPE, context_length=8192
    )


def _configs(repository: Path) -> dict[str, model_config_pb2.ModelConfig]:
    configs = {}
    for config in repository.glob("*/config.pbtxt"):
        text = config.read_text()
        assert "${" not in text, config
        configs[config.parent.name] = text_format.Parse(text, model_config_pb2.ModelConfig())
    return configs


def _check_dry_run(checkpoint: Path, target_name: str, out: Path) -> None:
    result = build(CATALOG, checkpoint, target_name, out, dry_run=True, model_id="m")
    target, plan = CATALOG.get(target_name), result.plan
    convert, trtllm_build = (step.command for step in plan.steps)
    flags = dict(zip(trtllm_build[1::2], trtllm_build[2::2], strict=False))
    if target.quantization == "fp8":
        assert convert[1].endswith("quantize.py")
        assert convert[convert.index("--qformat") : convert.index("--qformat") + 2] == ["--qformat", "fp8"]
        assert "--kv_cache_dtype" in convert and convert[convert.index("--kv_cache_dtype") + 1] == "fp8"
        assert flags["--gemm_plugin"] == "disable"
    else:
        assert convert[1].endswith("convert_checkpoint.py")
        assert flags["--gemm_plugin"] == "auto"
        if "weight_only" in target.quantization:
            assert "--use_weight_only" in convert
    assert flags["--kv_cache_type"] == "paged" and flags["--use_paged_context_fmha"] == "enable"
    assert convert[convert.index("--tp_size") + 1] == str(target.tp_size)
    # Limits agree between the plan, the tensorrt_llm config and the gateway entry.
    configs = _configs(result.repository)
    assert set(configs) == {t.PREPROCESSING, t.TENSORRT_LLM, t.POSTPROCESSING, t.ENSEMBLE}
    trt = configs[t.TENSORRT_LLM]
    assert trt.max_batch_size == target.max_batch_size == int(flags["--max_batch_size"])
    assert trt.parameters["gpt_model_path"].string_value == str(plan.engine_dir) == flags["--output_dir"]
    assert trt.parameters["batch_scheduler_policy"].string_value == target.batch_scheduler_policy
    assert trt.parameters["enable_kv_cache_reuse"].string_value == str(target.enable_kv_cache_reuse).lower()
    assert configs[t.PREPROCESSING].instance_group[0].count == GPU_PREPROCESSING_INSTANCES
    assert configs[t.POSTPROCESSING].instance_group[0].count == 1  # one instance: streamed pieces stay in order
    entry = tomllib.loads(result.registry_entry.read_text())["models"][0]
    assert entry["context_length"] == plan.max_seq_len == int(flags["--max_seq_len"])
    assert entry["generation_model"] == t.TENSORRT_LLM
    GatewaySettings(models=[entry])  # a valid gateway registry entry
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["dry_run"] and manifest["commands"] == [s.shell() for s in plan.steps]
    assert len(manifest["checkpoint_sha256"]) == 64
    # The Triton image's entry point starts one tritonserver rank per GPU of the engine.
    assert world_size(result.repository) == target.world_size
    assert server_command(result.repository, world_size(result.repository)).count("tritonserver") == target.world_size


@pytest.mark.parametrize("target_name", GPU_TARGETS)
def test_dry_run_for_every_gpu_target_on_smollm2(reference_checkpoint: Path, target_name: str, tmp_path: Path) -> None:
    if CATALOG.get(target_name).tp_size > 1:
        # SmolLM2 has 9 attention heads and 3 key/value heads: two-way tensor parallelism cannot split them.
        with pytest.raises(CheckpointError, match="does not divide the model's 9 attention heads"):
            build(CATALOG, reference_checkpoint, target_name, tmp_path, dry_run=True, model_id="m")
        return
    _check_dry_run(reference_checkpoint, target_name, tmp_path / "repo")


@pytest.mark.parametrize("target_name", GPU_TARGETS)
def test_dry_run_for_every_gpu_target_on_a_tiny_checkpoint(
    tiny_long_context: Path, target_name: str, tmp_path: Path
) -> None:
    _check_dry_run(tiny_long_context, target_name, tmp_path / "repo")


def test_cpu_target_builds_a_repository_the_embedded_triton_serves(tiny_long_context: Path, tmp_path: Path) -> None:
    result = build(CATALOG, tiny_long_context, "cpu", tmp_path / "repo", dry_run=False, model_id="tiny")
    assert result.plan.steps == []
    assert set(_configs(result.repository)) == {t.PREPROCESSING, t.CPU_LLM, t.POSTPROCESSING, t.ENSEMBLE}
    with EmbeddedTriton(result.repository, log_path=tmp_path / "triton.log") as server:
        client = StreamingClient(server.grpc_url)
        try:
            completion = client.complete("Hello world", 8, stream=True, temperature=0.0)
        finally:
            client.close()
    assert completion.error is None and completion.tokens == 8


def test_unknown_target_is_refused(
    reference_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "build",
        "--checkpoint",
        str(reference_checkpoint),
        "--target",
        "tpu-v9",
        "--out",
        str(tmp_path),
        "--dry-run",
    ]
    assert build_engines_main(args) == 1
    assert "unknown target 'tpu-v9'" in capsys.readouterr().err
    assert not (tmp_path / MANIFEST_FILE).exists()


def test_checkpoint_problems_are_refused_before_any_step(tiny_long_context: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (broken / name).write_text((tiny_long_context / name).read_text())
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors weights"):
        build(CATALOG, broken, "h100", tmp_path / "out", dry_run=True, model_id="m")
    (broken / "model.safetensors").write_bytes((tiny_long_context / "model.safetensors").read_bytes())
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel"):
        build(CATALOG, broken, "h100", tmp_path / "out", dry_run=True, model_id="m")
    (broken / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}))
    with pytest.raises(
        CheckpointError, match=r"context length \(2048\) is shorter than target h100's max_seq_len \(8192\)"
    ):
        build(CATALOG, broken, "h100", tmp_path / "out", dry_run=True, model_id="m")
    assert not (tmp_path / "out").exists()


def test_fp8_on_a_gpu_generation_without_it_is_refused(tmp_path: Path) -> None:
    text = TARGETS_FILE.read_text() + (
        '\n[targets.a100-fp8]\ngpu = "A100"\ncompute_capability = "8.0"\ngeneration_model = "tensorrt_llm"\n'
        'dtype = "bfloat16"\nquantization = "fp8"\nkv_cache_dtype = "fp8"\ntp_size = 1\npp_size = 1\n'
        "max_batch_size = 8\nmax_input_len = 1024\nmax_seq_len = 2048\nmax_num_tokens = 2048\n"
        "kv_cache_free_gpu_mem_fraction = 0.9\nenable_chunked_context = true\nenable_kv_cache_reuse = false\n"
        'batch_scheduler_policy = "guaranteed_no_evict"\n'
    )
    custom = tmp_path / "targets.toml"
    custom.write_text(text)
    with pytest.raises(TargetError, match=r"FP8 needs compute capability 8\.9"):
        load_targets(custom)


_A100_TARGET = (
    '\n[targets.mine]\ngpu = "A100"\ncompute_capability = "8.0"\ngeneration_model = "tensorrt_llm"\n'
    'dtype = "bfloat16"\nquantization = "none"\nkv_cache_dtype = "auto"\ntp_size = 1\npp_size = 1\n'
    "max_batch_size = 8\nmax_input_len = 1024\nmax_seq_len = 2048\nmax_num_tokens = 2048\n"
    "kv_cache_free_gpu_mem_fraction = 0.9\nenable_chunked_context = true\nenable_kv_cache_reuse = false\n"
    'batch_scheduler_policy = "guaranteed_no_evict"\n'
)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('dtype = "bfloat16"', 'dtype = "float32"'), "GPU targets build float16 or bfloat16 engines"),
        (('compute_capability = "8.0"', 'compute_capability = "ampere"'), "'ampere' is not major.minor"),
        (("fraction = 0.9", "fraction = 0.0"), "leaves TensorRT-LLM no memory for the KV cache"),
    ],
)
def test_inconsistent_gpu_targets_are_refused(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    custom = tmp_path / "targets.toml"
    custom.write_text(TARGETS_FILE.read_text() + _A100_TARGET)
    assert load_targets(custom).get("mine").gpu == "A100"
    custom.write_text(TARGETS_FILE.read_text() + _A100_TARGET.replace(*change))
    with pytest.raises(TargetError, match=message):
        load_targets(custom)


def test_the_gateway_entry_is_valid_toml_for_any_model_id(tiny_long_context: Path, tmp_path: Path) -> None:
    model_id = 'team "a" \\ model'
    result = build(CATALOG, tiny_long_context, "a10g", tmp_path / "repo", dry_run=True, model_id=model_id)
    entry = tomllib.loads(result.registry_entry.read_text())["models"][0]
    assert entry["id"] == model_id and entry["tokenizer_dir"] == str(tiny_long_context.resolve())


def test_a_dry_run_does_not_overwrite_a_built_repository(tiny_long_context: Path, tmp_path: Path) -> None:
    from build_engines.build import BuildFailed

    built = build(CATALOG, tiny_long_context, "cpu", tmp_path / "repo", dry_run=False, model_id="tiny")
    before = {p: p.read_bytes() for p in built.repository.rglob("*") if p.is_file()}
    with pytest.raises(BuildFailed, match="holds a built repository"):
        build(CATALOG, tiny_long_context, "a10g", tmp_path / "repo", dry_run=True, model_id="tiny")
    assert {p: p.read_bytes() for p in built.repository.rglob("*") if p.is_file()} == before
    build(CATALOG, tiny_long_context, "a10g", tmp_path / "plan", dry_run=True, model_id="tiny")
    build(CATALOG, tiny_long_context, "h100", tmp_path / "plan", dry_run=True, model_id="tiny")  # dry over dry


def test_the_repository_command_wants_a_checkpoint_and_reports_path_errors(
    tiny_long_context: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokenizer_only = tmp_path / "tok"
    tokenizer_only.mkdir()
    (tokenizer_only / "tokenizer.json").write_bytes((tiny_long_context / "tokenizer.json").read_bytes())
    assert build_engines_main(["repository", "--checkpoint", str(tokenizer_only), "--out", str(tmp_path / "r")]) == 1
    assert "config.json is missing" in capsys.readouterr().err
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert build_engines_main(["repository", "--checkpoint", str(tiny_long_context), "--out", str(a_file)]) == 1
    assert "error: " in capsys.readouterr().err
    config = json.loads((tiny_long_context / "config.json").read_text())
    del config["num_attention_heads"]
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("tokenizer.json", "model.safetensors"):
        (broken / name).write_bytes((tiny_long_context / name).read_bytes())
    (broken / "config.json").write_text(json.dumps(config))
    assert build_engines_main(["repository", "--checkpoint", str(broken), "--out", str(tmp_path / "r")]) == 1
    assert "config.json: no 'num_attention_heads'" in capsys.readouterr().err


def test_a_user_can_add_a_target_without_code(tiny_long_context: Path, tmp_path: Path) -> None:
    custom = tmp_path / "targets.toml"
    custom.write_text(TARGETS_FILE.read_text().replace("[targets.a10g]", "[targets.my-a10g]"))
    catalog: TargetCatalog = load_targets(custom)
    result = build(catalog, tiny_long_context, "my-a10g", tmp_path / "repo", dry_run=True, model_id="m")
    assert result.plan.target.name == "my-a10g"
    assert np.all([(tmp_path / "repo" / name).exists() for name in (REGISTRY_ENTRY_FILE, MANIFEST_FILE)])


def test_real_builds_refuse_to_run_without_tensorrt_llm(tiny_long_context: Path, tmp_path: Path) -> None:
    from build_engines.build import BuildFailed

    with pytest.raises(
        BuildFailed, match=r"TensorRT-LLM is not installed here: build inside nvcr\.io/nvidia/tritonserver"
    ):
        build(CATALOG, tiny_long_context, "a10g", tmp_path / "repo", dry_run=False, model_id="m")


def _engine_config(plan_target: str, checkpoint: Path, out: Path, **changes: object) -> tuple[object, Path]:
    result = build(CATALOG, checkpoint, plan_target, out, dry_run=True, model_id="m")
    plan = result.plan
    target = plan.target
    config = {
        "pretrained_config": {
            "architecture": plan.model.architecture,
            "dtype": target.dtype,
            "mapping": {"tp_size": target.tp_size, "pp_size": target.pp_size},
            "quantization": {"quant_algo": "FP8" if target.quantization == "fp8" else None},
        },
        "build_config": {
            "max_batch_size": target.max_batch_size,
            "max_input_len": target.max_input_len,
            "max_seq_len": plan.max_seq_len,
        },
    }
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        config[section][key] = value  # type: ignore[index]
    plan.engine_dir.mkdir(parents=True)
    (plan.engine_dir / "config.json").write_text(json.dumps(config))
    for rank in range(target.world_size):
        (plan.engine_dir / f"rank{rank}.engine").write_bytes(b"")
    return plan, plan.engine_dir


def test_fp8_calibration_can_read_a_local_set(tiny_long_context: Path, tmp_path: Path) -> None:
    # quantize.py downloads its default set: an offline cluster names a local copy.
    default = build(CATALOG, tiny_long_context, "h100", tmp_path / "a", dry_run=True, model_id="m")
    assert "--calib_dataset" not in default.plan.steps[0].command
    local = build(
        CATALOG, tiny_long_context, "h100", tmp_path / "b", dry_run=True, model_id="m", calib_dataset="/data/c"
    )
    quantize = local.plan.steps[0].command
    assert quantize[quantize.index("--calib_dataset") + 1] == "/data/c" and "/data/c" in local.plan.steps[0].name


def test_engine_verification_accepts_what_the_target_asked_for(tiny_long_context: Path, tmp_path: Path) -> None:
    from build_engines.build import verify_engine

    plan, _ = _engine_config("h100-tp2", tiny_long_context, tmp_path / "repo")
    verify_engine(plan)  # type: ignore[arg-type]


def test_engine_verification_names_every_disagreement(tiny_long_context: Path, tmp_path: Path) -> None:
    from build_engines.build import BuildFailed, verify_engine

    plan, engine_dir = _engine_config("h100", tiny_long_context, tmp_path / "repo", build_config__max_seq_len=4096)
    with pytest.raises(BuildFailed, match="max_seq_len: engine 4096, target 8192"):
        verify_engine(plan)  # type: ignore[arg-type]
    plan, engine_dir = _engine_config("a10g", tiny_long_context, tmp_path / "repo2")
    (engine_dir / "rank0.engine").unlink()
    with pytest.raises(BuildFailed, match=r"no engine for rank\(s\) \[0\]"):
        verify_engine(plan)  # type: ignore[arg-type]


def test_engine_verification_knows_the_names_modelopt_records(tiny_long_context: Path, tmp_path: Path) -> None:
    """FP8 checkpoints come from ModelOpt's export, which records a Mistral model as a llama (TensorRT-LLM 0.14)."""
    from build_engines.build import BuildFailed, verify_engine

    mistral = tmp_path / "mistral"
    mistral.mkdir()
    for source in tiny_long_context.iterdir():
        (mistral / source.name).write_bytes(source.read_bytes())
    config = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    plan, _ = _engine_config("h100", mistral, tmp_path / "a", pretrained_config__architecture="LlamaForCausalLM")
    verify_engine(plan)  # type: ignore[arg-type]
    plan, _ = _engine_config("h100", mistral, tmp_path / "b", pretrained_config__architecture="QWenForCausalLM")
    with pytest.raises(BuildFailed, match="architecture: engine 'QWenForCausalLM', target 'MistralForCausalLM'"):
        verify_engine(plan)  # type: ignore[arg-type]
    # convert_checkpoint.py (every other quantization) records the Hugging Face name: nothing else passes there.
    plan, _ = _engine_config("a10g", mistral, tmp_path / "c", pretrained_config__architecture="LlamaForCausalLM")
    with pytest.raises(BuildFailed, match="architecture: engine 'LlamaForCausalLM', target 'MistralForCausalLM'"):
        verify_engine(plan)  # type: ignore[arg-type]


def test_lora_builds_plan_the_lora_plugin_and_configure_the_lora_cache(tiny_long_context: Path, tmp_path: Path) -> None:
    target = CATALOG.get("h100")
    result = build(CATALOG, tiny_long_context, "h100", tmp_path / "gpu", dry_run=True, model_id="m", lora=True)
    trtllm_build = result.plan.steps[-1].command
    modules = trtllm_build[trtllm_build.index("--lora_target_modules") + 1 :]
    assert trtllm_build[trtllm_build.index("--lora_plugin") + 1] == "auto"
    assert trtllm_build[trtllm_build.index("--max_lora_rank") + 1] == str(target.lora_max_rank)
    # TensorRT-LLM's module names: its mlp_h_to_4h is Llama's gate_proj, its mlp_gate Llama's up_proj.
    assert modules == ["attn_q", "attn_k", "attn_v", "attn_dense", "mlp_h_to_4h", "mlp_gate", "mlp_4h_to_h"]
    trt = _configs(result.repository)[t.TENSORRT_LLM]
    assert trt.parameters["lora_cache_max_adapter_size"].string_value == str(target.lora_max_rank)
    assert float(trt.parameters["lora_cache_gpu_memory_fraction"].string_value) == target.lora_cache_gpu_memory_fraction
    assert {i.name for i in trt.input} >= {t.LORA_TASK_ID, t.LORA_WEIGHTS, t.LORA_CONFIG}
    # TensorRT-LLM takes adapter weights only in the engine's dtype: bfloat16 here, through the ensemble too.
    assert target.dtype == "bfloat16"
    for model in (t.TENSORRT_LLM, t.ENSEMBLE):
        weights = next(i for i in _configs(result.repository)[model].input if i.name == t.LORA_WEIGHTS)
        assert weights.data_type == model_config_pb2.TYPE_BF16, model
    entry = tomllib.loads(result.registry_entry.read_text())["models"][0]
    settings = GatewaySettings(models=[entry])
    assert settings.models[0].lora is not None and settings.models[0].lora.max_rank == target.lora_max_rank
    assert settings.models[0].lora.weights_dtype == "bfloat16"
    half = build(CATALOG, tiny_long_context, "a10g", tmp_path / "a10g", dry_run=True, model_id="m", lora=True)
    assert CATALOG.get("a10g").dtype == "float16"
    half_weights = next(i for i in _configs(half.repository)[t.TENSORRT_LLM].input if i.name == t.LORA_WEIGHTS)
    assert half_weights.data_type == model_config_pb2.TYPE_FP16
    assert (
        GatewaySettings(models=tomllib.loads(half.registry_entry.read_text())["models"]).models[0].lora.weights_dtype
        == "float16"
    )
    manifest = json.loads((tmp_path / "gpu" / MANIFEST_FILE).read_text())
    assert manifest["lora"] == {"max_rank": target.lora_max_rank, "target_modules": target.lora_target_modules}
    # Without --lora: no plugin, no LoRA table for the gateway (custom models are refused on that base).
    plain = build(CATALOG, tiny_long_context, "h100", tmp_path / "plain", dry_run=True, model_id="m")
    assert "--lora_plugin" not in plain.plan.steps[-1].command
    assert GatewaySettings(models=tomllib.loads(plain.registry_entry.read_text())["models"]).models[0].lora is None
    # The CPU target renders the same limits into cpu_llm.
    cpu = build(CATALOG, tiny_long_context, "cpu", tmp_path / "cpu", dry_run=True, model_id="m", lora=True)
    cpu_llm = _configs(cpu.repository)[t.CPU_LLM]
    assert cpu_llm.parameters["lora_max_rank"].string_value == str(CATALOG.get("cpu").lora_max_rank)
    assert cpu_llm.parameters["lora_cache_max_adapters"].string_value == str(CATALOG.get("cpu").lora_cache_max_adapters)


@pytest.mark.transformers
def test_llava_checkpoints_plan_a_vision_engine_and_a_prompt_table(tmp_path: Path) -> None:
    from tests.llava_checkpoints import TOKENS_PER_IMAGE, write_tiny_llava

    llava = write_tiny_llava(tmp_path / "llava")
    custom = tmp_path / "targets.toml"
    small = TARGETS_FILE.read_text().replace("[targets.a10g]", "[targets.a10g-llava]\nmax_images_per_request = 2")
    custom.write_text(
        small.replace("max_input_len = 2048\nmax_seq_len = 4096", "max_input_len = 256\nmax_seq_len = 512")
    )
    catalog = load_targets(custom)
    result = build(catalog, llava, "a10g-llava", tmp_path / "repo", dry_run=True, model_id="llava")
    target = catalog.get("a10g-llava")
    convert, trtllm_build, visual = (step.command for step in result.plan.steps)
    assert convert[1].endswith("llama/convert_checkpoint.py")
    table_rows = trtllm_build[trtllm_build.index("--max_prompt_embedding_table_size") + 1]
    assert int(table_rows) == target.max_batch_size * 2 * TOKENS_PER_IMAGE
    assert (
        visual[1].endswith("multimodal/build_visual_engine.py") and visual[visual.index("--model_type") + 1] == "llava"
    )
    configs = _configs(result.repository)
    assert set(configs) == {t.PREPROCESSING, t.MULTIMODAL_ENCODERS, t.TENSORRT_LLM, t.POSTPROCESSING, t.ENSEMBLE}
    ensemble = configs[t.ENSEMBLE]
    assert t.IMAGE_BYTES_INPUT in {i.name for i in ensemble.input}
    generation_step = next(s for s in ensemble.ensemble_scheduling.step if s.model_name == t.TENSORRT_LLM)
    assert generation_step.input_map[t.PROMPT_EMBEDDING_TABLE] == "_PROMPT_EMBEDDING_TABLE"
    table_input = next(i for i in configs[t.TENSORRT_LLM].input if i.name == t.PROMPT_EMBEDDING_TABLE)
    assert table_input.data_type == model_config_pb2.TYPE_FP16
    entry = tomllib.loads(result.registry_entry.read_text())["models"][0]
    assert entry["accepts_images"] is True
    # Images are the same placeholder ids in every prompt: KV-cache reuse would mix two images' blocks.
    assert target.enable_kv_cache_reuse
    assert configs[t.TENSORRT_LLM].parameters["enable_kv_cache_reuse"].string_value == "false"
    # The converter records the language model's architecture; the built engine is checked against that.
    from build_engines.build import verify_engine

    result.plan.engine_dir.mkdir(parents=True)
    (result.plan.engine_dir / "config.json").write_text(json.dumps({
        "pretrained_config": {"architecture": "LlamaForCausalLM", "dtype": target.dtype, "quantization": {},
                              "mapping": {"tp_size": target.tp_size, "pp_size": target.pp_size}},
        "build_config": {"max_batch_size": target.max_batch_size, "max_input_len": target.max_input_len,
                         "max_seq_len": result.plan.max_seq_len},
    }))  # fmt: skip
    (result.plan.engine_dir / "rank0.engine").write_bytes(b"")
    verify_engine(result.plan)
    # multimodal_encoders runs the vision engine the plan builds; where TensorRT-LLM is missing it says so.
    engine_dir = configs[t.MULTIMODAL_ENCODERS].parameters["visual_engine_dir"].string_value
    assert engine_dir == visual[visual.index("--output_dir") + 1]
    from triton_models.multimodal_encoders import image_encoder

    with pytest.raises(RuntimeError, match="TensorRT-LLM is not importable here"):
        image_encoder(llava, engine_dir)
    # bfloat16 targets are refused for vision-language checkpoints, with the reason.
    bf16 = custom.read_text().replace('dtype = "float16"', 'dtype = "bfloat16"', 1)
    (tmp_path / "bf16.toml").write_text(bf16)
    first_fp16 = next(n for n, tg in load_targets(custom).targets.items() if tg.is_gpu and tg.dtype == "float16")
    with pytest.raises(CheckpointError, match="float16 prompt table"):
        build(load_targets(tmp_path / "bf16.toml"), llava, first_fp16, tmp_path / "x", dry_run=True, model_id="m")
