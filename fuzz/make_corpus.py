"""Writes the fuzz targets' seed corpus (fuzz/corpus/<target>/): small valid inputs that reach every
stage a target runs, from which the fuzzer mutates. Run once by a developer; the files are committed.

    python3 -m venv target/corpus-venv && target/corpus-venv/bin/pip install gguf==0.17.1 numpy
    target/corpus-venv/bin/python fuzz/make_corpus.py
"""
import json
import pathlib
import struct

import gguf
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"
TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def write(target, name, data):
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def tiny_gguf(path, quantized):
    """One layer of a Llama of hidden size 32, with a byte-level BPE tokenizer and a template."""
    hidden, ffn, heads, kv_heads, vocab = 32, 64, 4, 2, 300
    head_dim = hidden // heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(1)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_rope_dimension_count(head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    byte_tokens = [chr(c) if 33 <= c <= 126 else f"<0x{c:02X}>" for c in range(256)]
    tokens = byte_tokens + ["he", "ll", "hell", "hello"] + [f"<|reserved_{i}|>" for i in range(vocab - 260)]
    w.add_token_list(tokens)
    w.add_token_types([1] * 260 + [3] * (vocab - 260))
    w.add_token_merges(["h e", "l l", "he ll", "hell o"])
    w.add_bos_token_id(260)
    w.add_eos_token_id(261)
    w.add_chat_template(TEMPLATE)
    rng = np.random.default_rng(1)

    def matrix(rows, cols):
        values = rng.standard_normal((rows, cols)).astype(np.float32)
        if quantized:
            return gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        return values, gguf.GGMLQuantizationType.F32

    def tensor(name, rows, cols):
        data, kind = matrix(rows, cols)
        w.add_tensor(name, data, raw_dtype=kind)

    tensor("token_embd.weight", vocab, hidden)
    w.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    for name, rows, cols in [("attn_q", hidden, hidden), ("attn_k", kv_heads * head_dim, hidden), ("attn_v", kv_heads * head_dim, hidden),
                             ("attn_output", hidden, hidden), ("ffn_gate", ffn, hidden), ("ffn_up", ffn, hidden), ("ffn_down", hidden, ffn)]:
        tensor(f"blk.0.{name}.weight", rows, cols)
    for name in ["attn_norm", "ffn_norm"]:
        w.add_tensor(f"blk.0.{name}.weight", np.ones(hidden, dtype=np.float32))
    w.add_tensor("rope_freqs.weight", np.ones(head_dim // 2, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def safetensors(tensors):
    """A safetensors file of (name, dtype, shape, bytes), with metadata."""
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def main():
    for quantized in [False, True]:
        path = CORPUS / "gguf" / ("tiny-q8_0.gguf" if quantized else "tiny-f32.gguf")
        path.parent.mkdir(parents=True, exist_ok=True)
        tiny_gguf(path, quantized)
    floats = np.arange(12, dtype=np.float32)
    write("safetensors", "f32-f16-bf16.safetensors", safetensors([
        ("model.embed_tokens.weight", "F32", [3, 4], floats.tobytes()),
        ("model.norm.weight", "F16", [4], np.ones(4, dtype=np.float16).tobytes()),
        ("lm_head.weight", "BF16", [2, 2], struct.pack("<4H", 0x3F80, 0x4000, 0x4040, 0x4080)),
    ]))
    write("safetensors", "empty.safetensors", safetensors([]))
    manifest = ROOT / "target" / "dawn" / "tiny-llama31" / "manifest.json"
    if manifest.exists():
        write("manifest", "tiny-llama31.json", manifest.read_bytes())
    else:
        raise SystemExit("the tiny fixture's manifest is made by bench/device.sh build-dawn (llama-webgpu convert)")
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                                                            "required": ["city"]}}}
    requests = {
        "chat.json": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello <|eot_id|>"}],
                      "max_tokens": 16, "temperature": 0.7, "top_p": 0.9, "stop": ["\n"], "seed": 1, "n": 2},
        "tools.json": {"messages": [{"role": "user", "content": "Weather in Paris?"},
                                    {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                                    {"role": "tool", "tool_call_id": "call_1", "content": "20"}],
                       "tools": [tool], "tool_choice": "auto", "builtin_tools": ["brave_search"]},
        "schema.json": {"messages": [{"role": "user", "content": "JSON please"}], "logprobs": True, "top_logprobs": 3,
                        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "strict": True,
                                                                                   "schema": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}}}},
        "grammar.json": {"messages": [{"role": "user", "content": "x"}],
                         "response_format": {"type": "grammar", "grammar": {"syntax": "lark", "definition": "start: /[a-z]+/"}}},
        "completion.json": {"prompt": "Once upon a time", "max_tokens": 8, "logprobs": 2, "echo": False},
        "prediction.json": {"messages": [{"role": "user", "content": "Rename x to n: let x = 1;"}], "temperature": 0,
                            "prediction": {"type": "content", "content": [{"type": "text", "text": "let x = 1;"}]}},
    }
    for name, body in requests.items():
        write("request", name, json.dumps(body))
    # Model outputs: stop strings before \x02, pieces (a token's text each) between \x01.
    outputs = {
        "llama3-json.txt": ([], ['{"name": "get_wea', 'ther", "parameters": {"city"', ': "Paris"}}']),
        "python-tag-search.txt": (["\nUser:"], ["Let me look.\n", "<|python", '_tag|>brave_search.call(query="Paris \\"weather\\"")']),
        "function-tag.txt": ([], ["Sure. ", "<function=get_weather>", '{"city": "Oslo"}', "</function>"]),
        "hermes.txt": ([], ["I'll check.\n", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>']),
        "code.txt": ([], ["<|python_tag|>", "import math\nprint(", "math.pi)"]),
        "mistral.txt": ([], ["Checking.", "[TOOL_CALLS]", ' [{"name": "get_weather", "arguments": {"city": "Oslo"}}]']),
        "mistral-args.txt": ([], ["[TOOL_CALLS]", "get_weather", "[ARGS]", '{"city": "Lima"}', "[TOOL_CALLS]", "get_weather[ARGS]{\"city\": \"Quito\"}"]),
        "stop.txt": (["###", "\n\n"], ["Grüße — 天気", " is fine.#", "## more"]),
        "overlapping-stops.txt": (["xUsery", "User"], ["Hi x", "User", "y"]),
    }
    for name, (stops, pieces) in outputs.items():
        write("output", name, ("\x01".join(stops) + "\x02" if stops else "") + "\x01".join(pieces))


if __name__ == "__main__":
    main()
