"""Fixtures for the server tests: a model folder with a tokenizer, and `llama-webgpu serve` processes.

The model is the tiny random-weight fixture tests/fixtures/tiny-llama31 (vocabulary 1003) with Meta's
Llama 3 tokenizer cut to its first 1003 ids, the recipe of `truncated_llama3_tokenizer` in
tests/common/mod.rs. With no chat template in the folder the server uses Llama 3.1's; its special
tokens become plain text pieces, which is all these tests need.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

REPO = Path(__file__).resolve().parents[2]
BINARY = REPO / "target" / "release" / "llama-webgpu"
FIXTURE = REPO / "tests" / "fixtures" / "tiny-llama31"
TOKENIZER = REPO / "target" / "models" / "llama3-tokenizer" / "tokenizer.json"
VOCAB = 1003
CONTEXT = 256
MAX_BODY_BYTES = 100_000
API_KEY = "test-key-1234"
# Every server's log and runtime folder, removed when the tests end (a failure prints the log's tail).
RUN_DIR = tempfile.TemporaryDirectory(prefix="llama-webgpu-server-tests-")


def truncated_tokenizer(vocab, added=None):
    """Meta's Llama 3 tokenizer cut to its first `vocab` ids; byte-level BPE stays complete (the
    first 256 ids are the bytes). `added` (id -> text): tokens of their own, not special, in place
    of the vocabulary's of those ids."""
    added = added or {}
    if not TOKENIZER.exists():
        pytest.fail(f"{TOKENIZER} is missing: run scripts/fetch-tokenizer (scripts/setup does)")
    tokenizer = json.loads(TOKENIZER.read_text(encoding="utf-8"))
    model = tokenizer["model"]
    kept = {token: id for token, id in model["vocab"].items() if id < vocab and id not in added}

    def kept_merge(merge):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        return a in kept and b in kept and a + b in kept

    model["merges"] = [m for m in model["merges"] if kept_merge(m)]
    model["vocab"] = {**kept, **{text: id for id, text in added.items()}}
    tokenizer["added_tokens"] = [
        {"id": id, "content": text, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": False}
        for id, text in added.items()
    ]
    tokenizer["post_processor"] = None
    return tokenizer


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("models") / "tiny-llama31-chat"
    directory.mkdir()
    for name in ["config.json", "generation_config.json", "model.safetensors.index.json"]:
        shutil.copy(FIXTURE / name, directory / name)
    for weights in FIXTURE.glob("*.safetensors"):
        shutil.copy(weights, directory / weights.name)
    with open(directory / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(truncated_tokenizer(VOCAB), f, ensure_ascii=False)
    return directory


def ensure_binary():
    if not BINARY.exists():
        subprocess.run(["cargo", "build", "--release", "--bin", "llama-webgpu"], cwd=REPO, check=True)


class HttpResponse:
    def __init__(self, status, body, headers=None):
        self.status_code = status
        self.content = body
        self.headers = headers or {}

    @property
    def text(self):
        return self.content.decode("utf-8", errors="replace")

    def json(self):
        return json.loads(self.content)


def http(method, url, body=None, headers=None, timeout=60):
    """One plain HTTP request (the standard library's), for what the OpenAI client would not send."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return HttpResponse(response.status, response.read(), response.headers)
    except urllib.error.HTTPError as error:
        return HttpResponse(error.code, error.read(), error.headers)


class Server:
    """One `llama-webgpu serve` process on a free port of 127.0.0.1, its log in a file."""

    def __init__(self, model_dir, *args, env=None):
        ensure_binary()
        self.log_path = Path(tempfile.mkstemp(prefix="serve-", suffix=".log", dir=RUN_DIR.name)[1])
        environment = dict(os.environ)
        environment.setdefault("XDG_RUNTIME_DIR", tempfile.mkdtemp(prefix="xdg-", dir=RUN_DIR.name))
        environment.setdefault("LLAMA_WEBGPU_LOG", "info")
        environment.update(env or {})
        command = [str(BINARY), "--quiet", "serve", "--model", str(model_dir), "--port", "0", "--context", str(CONTEXT)]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([*command, *args], stdout=log, stderr=subprocess.STDOUT, env=environment)
        self.url = self._wait_for_address(timeout=300)
        self._wait_for_health(timeout=60)

    def _wait_for_address(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"serving \S+ on (http://\S+)", self.log())
            if match:
                return match.group(1)
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise RuntimeError(f"the server did not start in {timeout} s:\n{self.log()}")

    def _wait_for_health(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            try:
                if http("GET", f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.05)

    def log(self):
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def health(self):
        response = http("GET", f"{self.url}/health", timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def client(self, api_key="unused", **options):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, **{"max_retries": 0, **options})

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture(scope="session")
def server(model_dir):
    # Four sequences together over a pool of 40 pages (640 positions at 384 bytes each in the f16 KV
    # cache lavapipe gets by default): requests without max_tokens may each reach a whole context
    # of 16 pages, and take them as they go.
    process = Server(model_dir, "--max-body-bytes", str(MAX_BODY_BYTES), "--parallel", "4", "--kv-memory", "240KiB", "--metrics")
    yield process
    process.stop()
    if os.environ.get("SERVER_LOG") == "1":
        print(process.log())


@pytest.fixture(scope="session")
def client(server):
    return server.client()


# A chat template short enough for the fixture's 256 positions, in Llama 3.1's tool-call format
# (which the server tells from the `<|python_tag|>` in its source): the tools by name, the turns.
SHORT_TOOL_TEMPLATE = (
    "{#- calls: <|python_tag|> -#}{{ tools | map(attribute='function.name') | join(',') if tools else '' }}\n"
    "{%- for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant: "
)


@pytest.fixture(scope="session")
def tools_server(model_dir, tmp_path_factory):
    """16 sequences together on the fixture with the short tool template, for 50-choice requests;
    named in the API as two names of its own."""
    directory = tmp_path_factory.mktemp("models") / "tiny-llama31-tools"
    shutil.copytree(model_dir, directory)
    (directory / "chat_template.jinja").write_text(SHORT_TOOL_TEMPLATE, encoding="utf-8")
    process = Server(directory, "--parallel", "16", "--kv-memory", "4MiB", "--served-model-name", "tools-model", "--served-model-name", "meta/llama-tools", "tools-model")
    yield process
    process.stop()


# The ids a reasoning model's thought markers take in the fixture's vocabulary (the two before
# its BOS and EOS), and a template that opens the thought as DeepSeek-R1's does.
THINK, THINK_END = 998, 999
THINKING_TEMPLATE = "{%- for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant: <think>\n"


@pytest.fixture(scope="session")
def thinking_server(model_dir, tmp_path_factory):
    """The fixture as a reasoning model: `<think>` and `</think>` tokens of their own (not special,
    as DeepSeek-R1's) and a template that opens the thought."""
    directory = tmp_path_factory.mktemp("models") / "tiny-llama31-thinking"
    shutil.copytree(model_dir, directory)
    tokenizer = truncated_tokenizer(VOCAB, {THINK: "<think>", THINK_END: "</think>"})
    with open(directory / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(tokenizer, f, ensure_ascii=False)
    (directory / "chat_template.jinja").write_text(THINKING_TEMPLATE, encoding="utf-8")
    process = Server(directory, "--parallel", "4", "--kv-memory", "1MiB")
    yield process
    process.stop()


def pytest_exception_interact(node, call, report):
    """Shows the tail of the server's log with a failure."""
    for name in ["server", "key_server", "tools_server", "thinking_server"]:
        process = getattr(node, "funcargs", {}).get(name)
        if isinstance(process, Server):
            tail = "\n".join(process.log().splitlines()[-40:])
            report.sections.append((f"{name} log (tail)", tail))
