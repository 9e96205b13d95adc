"""Every Triton model and tensor name of the repository, in one place.

The names follow NVIDIA's TensorRT-LLM backend layout (`inflight_batcher_llm`), so tools written for
it (Triton's `generate_stream`, genai-perf's TensorRT-LLM mode) work on ours. The `config.pbtxt`
templates spell the same names; a test checks that the rendered configs and this module agree.
"""

from __future__ import annotations

from typing import Final

# ---- models --------------------------------------------------------------------------------------
ENSEMBLE: Final = "ensemble"
PREPROCESSING: Final = "preprocessing"
POSTPROCESSING: Final = "postprocessing"
TENSORRT_LLM: Final = "tensorrt_llm"  # the GPU generation model (TensorRT-LLM's C++ backend)
CPU_LLM: Final = "cpu_llm"  # the CPU generation model: the same tensors as tensorrt_llm
MULTIMODAL_ENCODERS: Final = "multimodal_encoders"  # images → features (vision-language checkpoints)
ECHO_LLM: Final = "echo_llm"  # no model: streams the prompt back (benchmarks of everything but generation)

# ---- ensemble: what clients send and receive -----------------------------------------------------
TEXT_INPUT: Final = "text_input"
MAX_TOKENS: Final = "max_tokens"
STREAM: Final = "stream"
TEMPERATURE: Final = "temperature"
TOP_K: Final = "top_k"
TOP_P: Final = "top_p"
PRESENCE_PENALTY: Final = "presence_penalty"
FREQUENCY_PENALTY: Final = "frequency_penalty"
REPETITION_PENALTY: Final = "repetition_penalty"
# Named as in the pinned container's inflight_batcher_llm ensemble (see GEN_MIN_TOKENS below).
MIN_TOKENS: Final = "min_length"
SEED: Final = "random_seed"
STOP_WORDS: Final = "stop_words"
BAD_WORDS: Final = "bad_words"
END_ID: Final = "end_id"
PAD_ID: Final = "pad_id"
RETURN_LOG_PROBS: Final = "return_log_probs"
IMAGE_BYTES_INPUT: Final = "image_bytes_input"  # the request's images, each one encoded PNG/JPEG/WebP file
# LoRA, passed through to the generation model unchanged (TensorRT-LLM's names and formats): the task id
# alone once the server has the adapter cached, with the weights and config the first time.
LORA_TASK_ID: Final = "lora_task_id"  # uint64
LORA_WEIGHTS: Final = "lora_weights"  # float16 [rows, width]
LORA_CONFIG: Final = "lora_config"  # int32 [rows, 3]: module id, layer, rank

# This response's new tokens as text: valid UTF-8 (what Triton's generate_stream puts in JSON and NVIDIA's own
# postprocessing returns), so a character split across two responses shows as U+FFFD in each.
TEXT_OUTPUT: Final = "text_output"
# The exact bytes those tokens add to the text (uint8): the pieces of a stream concatenate to the text of the
# same request without streaming; consumers decode UTF-8 incrementally (the gateway does; it reads text_output
# only from a repository rendered before this output existed, where text_output carried the exact bytes).
TEXT_BYTES_OUTPUT: Final = "text_output_bytes"
OUTPUT_TOKEN_COUNT: Final = "output_token_count"  # new tokens in this response, for usage
CUM_LOG_PROBS: Final = "cum_log_probs"
OUTPUT_LOG_PROBS: Final = "output_log_probs"

# ---- generation model (tensorrt_llm and cpu_llm) -------------------------------------------------
INPUT_IDS: Final = "input_ids"
INPUT_LENGTHS: Final = "input_lengths"
REQUEST_OUTPUT_LEN: Final = "request_output_len"
GEN_END_ID: Final = "end_id"
GEN_PAD_ID: Final = "pad_id"
STOP_WORDS_LIST: Final = "stop_words_list"
BAD_WORDS_LIST: Final = "bad_words_list"
GEN_TEMPERATURE: Final = "temperature"
RUNTIME_TOP_K: Final = "runtime_top_k"
RUNTIME_TOP_P: Final = "runtime_top_p"
GEN_PRESENCE_PENALTY: Final = "presence_penalty"
GEN_FREQUENCY_PENALTY: Final = "frequency_penalty"
GEN_REPETITION_PENALTY: Final = "repetition_penalty"
# The names the pinned container's backend reads (NGC 24.10, TensorRT-LLM 0.14, build_engines/targets.toml):
# later releases renamed them min_tokens and seed, and an input the backend does not know is ignored without
# an error, so these follow the pin (the templates use the same names; test_repository_render checks them).
GEN_MIN_TOKENS: Final = "min_length"
GEN_SEED: Final = "random_seed"
STREAMING: Final = "streaming"
EXCLUDE_INPUT_IN_OUTPUT: Final = "exclude_input_in_output"
GEN_RETURN_LOG_PROBS: Final = "return_log_probs"
STOP: Final = "stop"
# p-tuning / image features: ids >= vocab_size in input_ids are rows of this table (float32 on CPU, the
# engine's dtype on GPUs); prompt_vocab_size = its rows.
PROMPT_EMBEDDING_TABLE: Final = "prompt_embedding_table"
PROMPT_VOCAB_SIZE: Final = "prompt_vocab_size"

OUTPUT_IDS: Final = "output_ids"
SEQUENCE_LENGTH: Final = "sequence_length"
GEN_CUM_LOG_PROBS: Final = "cum_log_probs"
GEN_OUTPUT_LOG_PROBS: Final = "output_log_probs"

# ---- preprocessing / postprocessing (NVIDIA's upper-case internal names) ------------------------
PRE_QUERY: Final = "QUERY"
PRE_STOP_WORDS_DICT: Final = "STOP_WORDS_DICT"
PRE_BAD_WORDS_DICT: Final = "BAD_WORDS_DICT"
PRE_END_ID: Final = "END_ID"
PRE_PAD_ID: Final = "PAD_ID"
PRE_INPUT_ID: Final = "INPUT_ID"
PRE_REQUEST_INPUT_LEN: Final = "REQUEST_INPUT_LEN"
PRE_STOP_WORDS_IDS: Final = "STOP_WORDS_IDS"
PRE_BAD_WORDS_IDS: Final = "BAD_WORDS_IDS"
PRE_OUT_END_ID: Final = "OUT_END_ID"
PRE_OUT_PAD_ID: Final = "OUT_PAD_ID"
PRE_IMAGE_BYTES: Final = "IMAGE_BYTES"
PRE_PROMPT_EMBEDDING_TABLE: Final = "PROMPT_EMBEDDING_TABLE"
PRE_PROMPT_VOCAB_SIZE: Final = "PROMPT_VOCAB_SIZE"

# ---- multimodal_encoders -------------------------------------------------------------------------
ENCODER_IMAGE_BYTES: Final = "IMAGE_BYTES"
ENCODER_OUT_TABLE: Final = "OUT_PROMPT_EMBEDDING_TABLE"  # [images * tokens per image, hidden]

POST_TOKENS_BATCH: Final = "TOKENS_BATCH"
POST_SEQUENCE_LENGTH: Final = "SEQUENCE_LENGTH"
POST_OUTPUT: Final = "OUTPUT"
POST_OUTPUT_BYTES: Final = "OUTPUT_BYTES"
POST_OUTPUT_TOKEN_COUNT: Final = "OUTPUT_TOKEN_COUNT"
POST_CUM_LOG_PROBS: Final = "CUM_LOG_PROBS"
POST_OUTPUT_LOG_PROBS: Final = "OUTPUT_LOG_PROBS"
POST_OUT_CUM_LOG_PROBS: Final = "OUT_CUM_LOG_PROBS"
POST_OUT_OUTPUT_LOG_PROBS: Final = "OUT_OUTPUT_LOG_PROBS"
