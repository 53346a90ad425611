"""The P/D proxy's protocol, between two stand-in vLLM HTTP servers that record what they get
(the real `vllm serve` run is bench/vllm/gpu.sh on the GPU machine)."""

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Upstream:
    """A stand-in vLLM instance on a thread: answers completions and records the bodies."""

    def __init__(self, role, fail=False):
        import asyncio
        import threading

        self.role, self.fail, self.seen = role, fail, []
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_post("/v1/completions", self.handle)
        app.router.add_post("/v1/chat/completions", self.handle)
        app.router.add_get("/v1/models", self.models)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    async def models(self, request):
        return web.json_response({"data": [{"id": "m"}]})

    async def handle(self, request):
        body = await request.json()
        self.seen.append((request.path, body, request.headers.get("X-Request-Id")))
        if self.fail:
            return web.json_response({"error": "down"}, status=500)
        if body.get("max_tokens") == 0:
            return web.json_response({"error": {"message": "max_tokens must be positive"}}, status=400)
        if self.role == "prefill":
            return web.json_response({"choices": [{"text": "x"}], "kv_transfer_params": {"prefixd": {"chunks": 3}}})
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for i in range(3):
                await resp.write(f"data: {json.dumps({'choices': [{'text': f't{i}'}]})}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            return resp
        return web.json_response({"choices": [{"text": "decoded"}], "kv_transfer_params": body.get("kv_transfer_params")})


@pytest.fixture()
def system():
    started = []

    def start(prefill_fail=False):
        p, d = Upstream("prefill", fail=prefill_fail), Upstream("decode")
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefixd.vllm.proxy", "--port", str(port), "--prefill",
             f"http://127.0.0.1:{p.port}", "--decode", f"http://127.0.0.1:{d.port}"],
            stderr=subprocess.PIPE, text=True,
        )
        started.append(proc)
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        return f"http://127.0.0.1:{port}", p, d

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(timeout=10)


def post(url, body, stream=False):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read().decode() if stream else json.loads(r.read())


def test_prefill_then_decode_with_the_returned_kv_params(system):
    url, p, d = system()
    r = post(f"{url}/v1/completions", {"model": "m", "prompt": [1, 2, 3], "max_tokens": 32, "stream": False,
                                       "min_tokens": 4})
    assert r["choices"][0]["text"] == "decoded"
    (_, pb, prid), (_, db, drid) = p.seen[0], d.seen[0]
    assert pb["max_tokens"] == 1 and pb["stream"] is False and "min_tokens" not in pb
    assert pb["kv_transfer_params"]["do_remote_decode"] is True, "NIXL-style connectors see their flag"
    assert db["kv_transfer_params"] == {"prefixd": {"chunks": 3}}, "the prefill's params go to the decode"
    assert db["max_tokens"] == 32 and db["min_tokens"] == 4, "the decode gets the client's request"
    assert prid and prid == drid, "one request id on both"


def test_chat_and_streaming_are_relayed(system):
    url, p, d = system()
    text = post(f"{url}/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                "max_completion_tokens": 9, "stream": True,
                                                "stream_options": {"include_usage": True}}, stream=True)
    assert text.count("data:") == 4 and text.rstrip().endswith("[DONE]")
    pb = p.seen[0][1]
    assert pb["max_completion_tokens"] == 1 and "stream_options" not in pb and pb["stream"] is False
    assert d.seen[0][1]["stream"] is True


def test_a_failed_prefill_still_gets_an_answer(system):
    url, p, d = system(prefill_fail=True)
    r = post(f"{url}/v1/completions", {"model": "m", "prompt": "hello", "max_tokens": 5})
    assert r["choices"][0]["text"] == "decoded"
    assert "kv_transfer_params" not in d.seen[0][1], "nothing to load: the decode computes the prompt"


def test_bad_requests_get_the_engines_error(system):
    url, p, d = system()
    with pytest.raises(urllib.error.HTTPError) as e:
        post(f"{url}/v1/completions", {"model": "m", "prompt": "x", "max_tokens": 0})
    assert e.value.code == 400
    with pytest.raises(urllib.error.HTTPError) as e:
        req = urllib.request.Request(f"{url}/v1/completions", data=b"{not json", headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400
