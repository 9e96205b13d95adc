"""cpu_llm's prompt_embedding_table / prompt_vocab_size inputs (TensorRT-LLM's), against the real Triton server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from cpu_engine import Engine
from tests.prompts import VARIED_PROMPTS
from tests.triton_client import StreamingClient, infer_input
from triton_models import tensors as t
from triton_models.launcher import EmbeddedTriton


def _generate(client: StreamingClient, request_id: str, ids: list[int], extra: list) -> tuple[list[int], str | None]:
    inputs = [
        infer_input(t.INPUT_IDS, np.array(ids, dtype=np.int32)),
        infer_input(t.INPUT_LENGTHS, np.int32(len(ids))),
        infer_input(t.REQUEST_OUTPUT_LEN, np.int32(12)),
        infer_input(t.RUNTIME_TOP_K, np.int32(1)),
        *extra,
    ]
    client.send(t.CPU_LLM, inputs, request_id)
    result, error = client.responses.get(timeout=60)
    if error is not None:
        return [], str(error)
    return [int(v) for v in result.as_numpy(t.OUTPUT_IDS).reshape(-1)], None


def test_table_rows_replace_the_ids_past_the_vocabulary(
    reference_triton: EmbeddedTriton, reference_engine: Engine, reference_checkpoint: Path
) -> None:
    tokenizer = Tokenizer.from_file(str(reference_checkpoint / "tokenizer.json"))
    ids = tokenizer.encode(VARIED_PROMPTS[0]).ids
    vocab = reference_engine.config.vocab_size
    table = reference_engine.model.embed[ids[2:5]].astype(np.float32)  # rows = the embeddings of three tokens
    with_table = [*ids[:2], vocab, vocab + 1, vocab + 2, *ids[5:]]
    client = StreamingClient(reference_triton.grpc_url)
    try:
        plain, error = _generate(client, "plain", ids, [])
        assert error is None
        table_inputs = [
            infer_input(t.PROMPT_EMBEDDING_TABLE, table[None]),
            infer_input(t.PROMPT_VOCAB_SIZE, np.int32(3)),
        ]
        served, error = _generate(client, "table", with_table, table_inputs)
        assert error is None and served == plain
        _, error = _generate(client, "no-table", with_table, [])
        assert error is not None and "for the prompt table's rows" not in error and "token ids must be in" in error
        wrong_size = [table_inputs[0], infer_input(t.PROMPT_VOCAB_SIZE, np.int32(4))]
        _, error = _generate(client, "wrong", with_table, wrong_size)
        assert error is not None and "'prompt_vocab_size' (4) is not the table's 3 rows" in error
    finally:
        client.close()
