"""A stand-in for vLLM's OpenAI server, for tests that check loratui's side of the vLLM engine without vLLM.

It answers /health, streams /v1/completions (the reply says which model and how many prompt tokens it got),
loads and unloads LoRA adapters, writes every completion request body to ``$FAKE_VLLM_DIR/requests.jsonl``,
and starts a child that sleeps, as vLLM's engine-core process does: its pid and the child's go to
``$FAKE_VLLM_DIR/pids``, so a test can check that nothing is left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

OUT = Path(os.environ["FAKE_VLLM_DIR"])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--served-model-name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int)
    p.add_argument("--lora-modules", nargs="*", default=[])
    p.add_argument("--fail", action="store_true")
    args, rest = p.parse_known_args()
    (OUT / "argv.json").write_text(json.dumps(sys.argv[1:]))
    if args.fail:
        print("fake vLLM: failing on purpose", flush=True)
        sys.exit(3)
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    (OUT / "pids").write_text(f"{os.getpid()} {engine.pid}\n")
    models = {args.served_model_name, *(m.split("=", 1)[0] for m in args.lora_modules)}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def _json(self, code: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/health":
                self._json(200, {})
            else:
                self._json(404, {"error": "no such route"})

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/v1/load_lora_adapter":
                models.add(body["lora_name"])
                return self._json(200, {})
            if self.path == "/v1/unload_lora_adapter":
                models.discard(body["lora_name"])
                return self._json(200, {})
            with (OUT / "requests.jsonl").open("a") as f:
                f.write(json.dumps(body) + "\n")
            if body["model"] not in models:
                return self._json(404, {"error": {"message": f"The model `{body['model']}` does not exist."}})
            words = f"model {body['model']} prompt {len(body['prompt'])} tokens".split()
            words = words + ["more"] * 1000 if body.get("temperature", 1) > 0 else words
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            sent = 0
            reason = "stop"
            for word in words:
                if sent == body["max_tokens"]:
                    reason = "length"
                    break
                chunk = {"choices": [{"index": 0, "text": word + " ", "finish_reason": None}]}
                try:
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    with (OUT / "aborted").open("a") as f:
                        f.write(body["model"] + "\n")
                    return
                sent += 1
                time.sleep(0.01)
            end = {"choices": [{"index": 0, "text": "", "finish_reason": reason}]}
            usage = {"choices": [], "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": sent}}
            self.wfile.write(f"data: {json.dumps(end)}\n\ndata: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
            self.wfile.flush()

    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
