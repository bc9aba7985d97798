"""A small stand-in for vLLM's OpenAI server on 127.0.0.1, answering the way vLLM's own code does.

No GPU here, so the vllm backend is checked against this: it accepts exactly the requests vLLM documents and
answers with vLLM's status codes and bodies, taken from its source:
- vllm/entrypoints/serve/lora/api_router.py: POST /v1/load_lora_adapter and /v1/unload_lora_adapter, JSON
  bodies only (validate_json_request: another Content-Type is refused with 415); a success is 200 with a
  plain-text body.
- vllm/entrypoints/serve/lora/protocol.py: LoadLoRAAdapterRequest {lora_name: str, lora_path: str},
  UnloadLoRAAdapterRequest {lora_name: str, lora_int_id: int | None} (a missing field: FastAPI's 422).
- vllm/entrypoints/openai/models/serving.py (OpenAIServingModels): both fields non-empty or 400 "Both
  'lora_name' and 'lora_path' must be provided."; a name already loaded (without load_inplace) 400 "The lora
  adapter '<name>' has already been loaded. ..."; unloading an unknown name 404 "The lora adapter '<name>'
  cannot be found."; a completion for a model that is neither the base nor a loaded adapter 404 "The model
  `<name>` does not exist." (check_model); errors as ErrorResponse {"error": {"message", "type", "param",
  "code"}}.
- Completions stream as `data: {...}` lines and `data: [DONE]`, with a last chunk holding `usage` when
  stream_options.include_usage is set.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


class FakeVllm:
    def __init__(self, base_name: str):
        self.base_name = base_name
        self.loaded: dict[str, str] = {}  # lora_name -> lora_path
        self.calls: list[tuple[str, str, Any]] = []  # (method, path, JSON body)
        self.refuse_paths: set[str] = set()  # lora paths whose load fails as a broken adapter would
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake.handle(self, "GET")

            def do_POST(self) -> None:
                fake.handle(self, "POST")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def restart(self) -> None:
        """What a vLLM restart does to runtime-loaded adapters: forgets them all."""
        with self.lock:
            self.loaded.clear()

    def requests(self, path: str) -> list[Any]:
        with self.lock:
            return [body for _, p, body in self.calls if p == path]

    # -- the server ----------------------------------------------------------------------------------------------

    def handle(self, req: BaseHTTPRequestHandler, method: str) -> None:
        length = int(req.headers.get("Content-Length") or 0)
        raw = req.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        with self.lock:
            self.calls.append((method, req.path, body))
        if method == "GET" and req.path == "/v1/models":
            cards = [{"id": self.base_name, "object": "model", "root": self.base_name, "parent": None}]
            cards += [{"id": n, "object": "model", "root": p, "parent": self.base_name} for n, p in self.loaded.items()]
            return reply(req, 200, {"object": "list", "data": cards})
        if method != "POST":
            return reply(req, 404, {"detail": "Not Found"})
        if req.path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            if (req.headers.get("Content-Type") or "").split(";")[0].strip().lower() != "application/json":
                return reply(req, 415, {"detail": "Unsupported Media Type: Only 'application/json' is allowed"})
            if not isinstance(body, dict) or not isinstance(body.get("lora_name"), str):
                return reply(req, 422, {"detail": [{"type": "missing", "loc": ["body", "lora_name"]}]})
            if req.path == "/v1/load_lora_adapter":
                return self.load(req, body)
            return self.unload(req, body)
        if req.path == "/v1/completions":
            return self.complete(req, body)
        return reply(req, 404, {"detail": "Not Found"})

    def load(self, req: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(path, str):
            return reply(req, 422, {"detail": [{"type": "missing", "loc": ["body", "lora_path"]}]})
        if not name or not path:
            return reply(req, 400, error("Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput",
                                         400))
        with self.lock:
            if name in self.loaded and not body.get("load_inplace"):
                return reply(req, 400, error(f"The lora adapter '{name}' has already been loaded. If you want to "
                                             "load the adapter in place, set 'load_inplace' to True.",
                                             "InvalidUserInput", 400))
        if path in self.refuse_paths or not (Path(path) / "adapter_config.json").is_file():
            return reply(req, 500, error(f"Loading lora {name} failed: No adapter found for {path}",
                                         "InternalServerError", 500))
        with self.lock:
            self.loaded[name] = path
        return reply_text(req, 200, f"Success: LoRA adapter '{name}' added successfully.")

    def unload(self, req: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        name = body["lora_name"]
        with self.lock:
            if name not in self.loaded:
                return reply(req, 404, error(f"The lora adapter '{name}' cannot be found.", "NotFoundError", 404))
            del self.loaded[name]
        return reply_text(req, 200, f"Success: LoRA adapter '{name}' removed successfully.")

    def complete(self, req: BaseHTTPRequestHandler, body: Any) -> None:
        model = body.get("model") if isinstance(body, dict) else None
        with self.lock:
            known = model == self.base_name or model in self.loaded
        if not known:
            return reply(req, 404, {"error": {"message": f"The model `{model}` does not exist.",
                                              "type": "NotFoundError", "param": "model", "code": 404}})
        text = f"<{model}>"  # what "generated" says which model answered
        pieces = [text[:5], text[5:]]
        usage = {"prompt_tokens": len(body["prompt"]) // 4, "completion_tokens": len(pieces),
                 "total_tokens": len(body["prompt"]) // 4 + len(pieces)}
        if not body.get("stream"):
            return reply(req, 200, {"id": "cmpl-x", "object": "text_completion", "model": model, "usage": usage,
                                    "choices": [{"index": 0, "text": text, "finish_reason": "stop"}]})
        req.send_response(200)
        req.send_header("Content-Type", "text/event-stream")
        req.end_headers()
        for i, piece in enumerate(pieces):
            finish = "stop" if i == len(pieces) - 1 else None
            chunk = {"id": "cmpl-x", "object": "text_completion", "model": model,
                     "choices": [{"index": 0, "text": piece, "finish_reason": finish}]}
            req.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            req.wfile.write(b"data: " + json.dumps({"id": "cmpl-x", "choices": [], "usage": usage}).encode() + b"\n\n")
        req.wfile.write(b"data: [DONE]\n\n")
        req.close_connection = True


def error(message: str, kind: str, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def reply(req: BaseHTTPRequestHandler, status: int, payload: Any) -> None:
    data = json.dumps(payload).encode()
    req.send_response(status)
    req.send_header("Content-Type", "application/json")
    req.send_header("Content-Length", str(len(data)))
    req.end_headers()
    req.wfile.write(data)


def reply_text(req: BaseHTTPRequestHandler, status: int, text: str) -> None:
    data = text.encode()
    req.send_response(status)
    req.send_header("Content-Type", "text/plain")
    req.send_header("Content-Length", str(len(data)))
    req.end_headers()
    req.wfile.write(data)
