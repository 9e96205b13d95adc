"""Triton Python model `cpu_llm`: the CPU engine behind TensorRT-LLM's tensor interface (decoupled).

`execute()` parses each request into a `GenerationRequest` and hands it to the scheduler thread, which
streams tokens back through the request's response sender and puts the final flag on the last response.
A request whose `stop` input is true ends the running request with the same request id, as it does with
TensorRT-LLM's backend (cancellation does not reach a decoupled model inside an ensemble).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cpu_engine import Engine, EngineLimits, GenerationRequest, SamplingParams
from cpu_engine.blas import generic_kernel_warning
from cpu_engine.lora import MODULES
from triton_models import tensors as t
from triton_models.lora_cache import LoraCache, LoraInput
from triton_models.scheduler import ScheduledRequest, Scheduler, SchedulerStats, StopRequest
from triton_models.triton_io import error_response, optional_tensor, pb_utils, required_tensor, scalar, tensor
from triton_models.word_lists import unpack_word_lists

# config.pbtxt parameters → EngineLimits fields (the rendered repository fills them from the target).
_LIMIT_PARAMETERS = ("max_batch_size", "max_kv_tokens", "max_num_tokens", "max_queue_size")


def parse_request(request: Any, engine_id: str, exclude_input_default: bool) -> tuple[GenerationRequest, bool, bool]:
    """(generation request, streaming, exclude input) from the tensorrt_llm-style inputs; ValueError names the input."""
    input_ids = required_tensor(request, t.INPUT_IDS).reshape(-1)
    lengths = optional_tensor(request, t.INPUT_LENGTHS)
    if lengths is not None and lengths.size:
        input_ids = input_ids[: int(lengths.reshape(-1)[0])]
    output_len = scalar(request, t.REQUEST_OUTPUT_LEN, None)
    if output_len is None:
        raise ValueError(f"input '{t.REQUEST_OUTPUT_LEN}' is required")
    end_id = scalar(request, t.GEN_END_ID, None)
    stop_words = optional_tensor(request, t.STOP_WORDS_LIST)
    bad_words = optional_tensor(request, t.BAD_WORDS_LIST)
    top_p = float(scalar(request, t.RUNTIME_TOP_P, 0.0))
    top_k = int(scalar(request, t.RUNTIME_TOP_K, 0))
    seed = scalar(request, t.GEN_SEED, None)
    sampling = SamplingParams(
        temperature=float(scalar(request, t.GEN_TEMPERATURE, 1.0)),
        # TensorRT-LLM's defaults: top_k 0 and top_p 0 (or absent) together mean greedy, whatever the
        # temperature; top_p 0 next to a top_k means top-k alone.
        top_k=1 if top_k == 0 and top_p <= 0.0 else top_k,
        top_p=1.0 if top_p <= 0.0 else top_p,
        repetition_penalty=float(scalar(request, t.GEN_REPETITION_PENALTY, 1.0)),
        presence_penalty=float(scalar(request, t.GEN_PRESENCE_PENALTY, 0.0)),
        frequency_penalty=float(scalar(request, t.GEN_FREQUENCY_PENALTY, 0.0)),
        seed=None if seed is None else int(seed),
    )
    try:
        stop_sequences = () if stop_words is None else unpack_word_lists(stop_words)
        bad_sequences = () if bad_words is None else unpack_word_lists(bad_words)
    except ValueError as error:
        raise ValueError(f"input '{t.STOP_WORDS_LIST}' or '{t.BAD_WORDS_LIST}': {error}") from error
    generation = GenerationRequest(
        request_id=engine_id,
        prompt_ids=tuple(int(i) for i in input_ids),
        max_new_tokens=int(output_len),
        sampling=sampling,
        # Without an end id nothing ends generation early, as with TensorRT-LLM's default of -1.
        end_ids=() if end_id is None or int(end_id) < 0 else (int(end_id),),
        stop_sequences=stop_sequences,
        bad_sequences=bad_sequences,
        min_tokens=int(scalar(request, t.GEN_MIN_TOKENS, 0)),
        return_log_probs=bool(scalar(request, t.GEN_RETURN_LOG_PROBS, False)),
        prompt_table=_prompt_table(request),
    )
    streaming = bool(scalar(request, t.STREAMING, False))
    exclude_input = bool(scalar(request, t.EXCLUDE_INPUT_IN_OUTPUT, exclude_input_default))
    return generation, streaming, exclude_input


def _prompt_table(request: Any) -> npt.NDArray[np.float32] | None:
    table = optional_tensor(request, t.PROMPT_EMBEDDING_TABLE)
    if table is None or table.size == 0:
        return None
    if table.ndim == 3 and table.shape[0] == 1:  # with the batch dimension
        table = table[0]
    rows = scalar(request, t.PROMPT_VOCAB_SIZE, None)
    if rows is not None and int(rows) != table.shape[0]:
        raise ValueError(f"'{t.PROMPT_VOCAB_SIZE}' ({rows}) is not the table's {table.shape[0]} rows")
    return np.ascontiguousarray(table, dtype=np.float32)


def parse_lora(request: Any) -> LoraInput | None:
    """The request's LoRA inputs (TensorRT-LLM's): a task id, with the weights and config or without both."""
    task_id = scalar(request, t.LORA_TASK_ID, None)
    weights = optional_tensor(request, t.LORA_WEIGHTS)
    config = optional_tensor(request, t.LORA_CONFIG)
    if task_id is None:
        if weights is not None or config is not None:
            raise ValueError(f"'{t.LORA_WEIGHTS}' and '{t.LORA_CONFIG}' need a '{t.LORA_TASK_ID}'")
        return None
    if (weights is None) != (config is None):
        raise ValueError(f"'{t.LORA_WEIGHTS}' and '{t.LORA_CONFIG}' must be given together")
    return LoraInput(int(task_id), weights, config)


def lora_cache_from(parameters: dict[str, str], engine: Engine) -> LoraCache:
    """The LoRA cache the rendered config asks for (lora_max_rank 0: LoRA off)."""
    modules = tuple(m for m in parameters.get("lora_target_modules", "").split(",") if m) or MODULES
    unknown = sorted(set(modules) - set(MODULES))
    if unknown:
        raise ValueError(f"parameter lora_target_modules: {unknown} are not among {list(MODULES)}")
    return LoraCache(
        engine.model.config,
        capacity=int(parameters.get("lora_cache_max_adapters", "0") or 0),
        max_rank=int(parameters.get("lora_max_rank", "0") or 0),
        modules=modules,
    )


def generation_response(tokens: list[int], log_probs: list[float], cum_log_prob: float) -> Any:
    return pb_utils().InferenceResponse(
        output_tensors=[
            tensor(t.OUTPUT_IDS, np.array(tokens, dtype=np.int32).reshape(1, 1, -1)),
            tensor(t.SEQUENCE_LENGTH, np.array([[len(tokens)]], dtype=np.int32)),
            tensor(t.GEN_CUM_LOG_PROBS, np.array([[cum_log_prob]], dtype=np.float32)),
            tensor(t.GEN_OUTPUT_LOG_PROBS, np.array(log_probs, dtype=np.float32).reshape(1, 1, -1)),
        ]
    )


class _Replier:
    """Answers one request through its response sender; the last response carries the final flag."""

    def __init__(self, sender: Any) -> None:
        self.sender = sender
        self.final = pb_utils().TRITONSERVER_RESPONSE_COMPLETE_FINAL

    def tokens(self, tokens: list[int], log_probs: list[float], cum_log_prob: float, last: bool) -> None:
        self.sender.send(generation_response(tokens, log_probs, cum_log_prob), flags=self.final if last else 0)

    def error(self, message: str) -> None:
        self.sender.send(error_response(message), flags=self.final)

    def acknowledge(self) -> None:
        self.sender.send(flags=self.final)


class _Metrics:
    """Custom Triton metrics (Prometheus): what the engine is doing right now."""

    def __init__(self, model_name: str) -> None:
        utils = pb_utils()
        labels = {"model": model_name}

        # Triton requires each MetricFamily to outlive its Metric objects: keep the families.
        self._families: list[Any] = []

        def family(name: str, description: str, kind: Any) -> Any:
            created = utils.MetricFamily(name=name, description=description, kind=kind)
            self._families.append(created)
            return created.Metric(labels=labels)

        def gauge(name: str, description: str) -> _Gauge:
            return _Gauge(family(name, description, utils.MetricFamily.GAUGE))

        def counter(name: str, description: str) -> _Counter:
            return _Counter(family(name, description, utils.MetricFamily.COUNTER))

        self.active = gauge("cpu_llm_active_sequences", "Sequences the CPU engine is generating")
        self.queued = gauge("cpu_llm_queued_requests", "Requests waiting for room in the CPU engine")
        self.kv_tokens = gauge("cpu_llm_kv_tokens_in_use", "Tokens held in the CPU engine's KV cache")
        self.lora_cached = gauge("cpu_llm_lora_adapters_cached", "LoRA adapters in the CPU engine's LoRA cache")
        self.generated = counter("cpu_llm_generated_tokens_total", "Tokens generated by the CPU engine")
        self.lora_loads = counter("cpu_llm_lora_loads_total", "LoRA adapters loaded from weights sent with a request")
        self.lora_misses = counter("cpu_llm_lora_cache_misses_total", "Requests for a LoRA task id not in the cache")
        self.lora_evictions = counter("cpu_llm_lora_evictions_total", "LoRA adapters evicted from the cache")

    def update(self, stats: SchedulerStats) -> None:
        # Every metric call is a round trip to the server through shared memory: only changes are sent.
        for gauge, value in (
            (self.active, stats.active_sequences),
            (self.queued, stats.queued_requests),
            (self.kv_tokens, stats.kv_tokens_in_use),
            (self.lora_cached, stats.lora_adapters_cached),
        ):
            gauge.set_to(value)
        self.generated.advance_to(stats.generated_tokens_total)
        self.lora_loads.advance_to(stats.lora_loads_total)
        self.lora_misses.advance_to(stats.lora_misses_total)
        self.lora_evictions.advance_to(stats.lora_evictions_total)


class _Gauge:
    """A Triton gauge that is told only when its value changes."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.value: float | None = None

    def set_to(self, value: float) -> None:
        if value != self.value:
            self.metric.set(value)
            self.value = value


class _Counter:
    """A Triton counter that follows a running total kept elsewhere."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.seen = 0

    def advance_to(self, total: int) -> None:
        if total > self.seen:
            self.metric.increment(total - self.seen)
            self.seen = total


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        limits = EngineLimits(**{name: int(parameters[name]) for name in _LIMIT_PARAMETERS if name in parameters})
        self.exclude_input_default = parameters.get("exclude_input_in_output", "true").lower() == "true"
        engine = Engine.from_checkpoint(Path(parameters["checkpoint_dir"]), limits)
        warning = generic_kernel_warning()
        if warning is not None:
            pb_utils().Logger.log_warn(f"{args['model_name']}: {warning}")
        self.metrics = _Metrics(args["model_name"])
        self.scheduler = Scheduler(engine, lora_cache_from(parameters, engine), on_step=self.metrics.update)
        self.scheduler.start()
        self._ids = itertools.count()

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            replier = _Replier(request.get_response_sender())
            try:
                if bool(scalar(request, t.STOP, False)):
                    if not request.request_id():
                        # As TensorRT-LLM's backend: without an id it would stop every request sent without one.
                        replier.error("a request id must be provided for request cancellation")
                        continue
                    self.scheduler.submit(StopRequest(request.request_id(), replier.acknowledge))
                    continue
                generation, streaming, exclude_input = parse_request(
                    request, f"{next(self._ids)}", self.exclude_input_default
                )
                lora = parse_lora(request)
            except ValueError as error:
                replier.error(str(error))
                continue
            self.scheduler.submit(
                ScheduledRequest(
                    generation=generation,
                    client_request_id=request.request_id(),
                    streaming=streaming,
                    prefix_ids=[] if exclude_input else list(generation.prompt_ids),
                    send=replier.tokens,
                    send_error=replier.error,
                    is_cancelled=request.is_cancelled,
                    lora=lora,
                )
            )
        return None

    def finalize(self) -> None:
        self.scheduler.shutdown()
