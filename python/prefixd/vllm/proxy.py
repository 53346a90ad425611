"""A disaggregated prefill/decode proxy for vLLM, speaking the protocol of vLLM's own proxies
(`disagg_proxy_server.py`, the NIXL toy proxy): each request goes to a prefill instance with
`max_tokens=1` and `kv_transfer_params`, then, with the `kv_transfer_params` the prefill
returned, to a decode instance, whose answer (streamed or not) goes back to the client.

Works with any connector that follows that protocol: prefixd's, NixlConnector, LMCache's. When
a prefill instance fails, the request still goes to a decode instance (which then computes the
prompt itself) and the failure is logged: a broken prefill tier costs speed, not answers.

    python -m prefixd.vllm.proxy --port 9100 \\
        --prefill http://127.0.0.1:7100 --decode http://127.0.0.1:7200

Several --prefill/--decode URLs are used round-robin. Needs aiohttp (a vLLM dependency).
"""

import argparse
import itertools
import json
import logging
import sys
import uuid

log = logging.getLogger("prefixd.vllm.proxy")

# What the NIXL-style connectors expect on the prefill request; prefixd's connector ignores them.
PREFILL_KV_PARAMS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def prefill_request(body, chat):
    """The prefill instance's version of a request: one token, not streamed."""
    p = dict(body)
    p["kv_transfer_params"] = dict(PREFILL_KV_PARAMS)
    p["stream"] = False
    p.pop("stream_options", None)
    p["max_tokens"] = 1
    if chat:
        p["max_completion_tokens"] = 1
        p.pop("min_completion_tokens", None)
    p.pop("min_tokens", None)
    return p


class Proxy:
    def __init__(self, prefill, decode, timeout_s):
        import aiohttp

        self.aiohttp = aiohttp
        self.prefill = itertools.cycle(prefill)
        self.decode = itertools.cycle(decode)
        self.decode_urls = list(decode)
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.session = None
        self.prefill_failures = 0

    async def start(self):
        connector = self.aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        self.session = self.aiohttp.ClientSession(connector=connector, timeout=self.timeout)

    async def close(self):
        if self.session is not None:
            await self.session.close()

    async def handle(self, request):
        web = self.aiohttp.web
        chat = request.path.endswith("/chat/completions")
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return web.json_response({"error": {"message": f"request body is not JSON: {e}"}}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": {"message": "request body must be a JSON object"}}, status=400)
        rid = request.headers.get("X-Request-Id") or str(uuid.uuid4())
        headers = {"X-Request-Id": rid}
        auth = request.headers.get("Authorization")
        if auth:
            headers["Authorization"] = auth
        kv_params = None
        prefill_url = next(self.prefill) + request.path
        try:
            async with self.session.post(prefill_url, json=prefill_request(body, chat), headers=headers) as r:
                if r.status != 200:
                    text = await r.text()
                    # The client's request itself is bad: say so, as vLLM did.
                    if 400 <= r.status < 500:
                        return web.Response(status=r.status, text=text, content_type="application/json")
                    raise RuntimeError(f"prefill answered {r.status}: {text[:200]}")
                kv_params = (await r.json()).get("kv_transfer_params")
        except Exception as e:  # a broken prefill tier costs speed, not answers
            self.prefill_failures += 1
            log.warning("prefill at %s failed (%s); the decode instance computes the prompt", prefill_url, e)
        decode_body = dict(body)
        if kv_params:
            decode_body["kv_transfer_params"] = kv_params
        else:
            decode_body.pop("kv_transfer_params", None)
        decode_url = next(self.decode) + request.path
        try:
            upstream = await self.session.post(decode_url, json=decode_body, headers=headers)
        except Exception as e:
            return web.json_response({"error": {"message": f"decode instance {decode_url}: {e}"}}, status=502)
        async with upstream:
            if not body.get("stream"):
                data = await upstream.read()
                return web.Response(status=upstream.status, body=data, content_type="application/json")
            resp = web.StreamResponse(status=upstream.status)
            resp.content_type = upstream.headers.get("Content-Type", "text/event-stream")
            await resp.prepare(request)
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    async def passthrough(self, request):
        """GET requests (models, health, metrics) go to a decode instance."""
        web = self.aiohttp.web
        url = self.decode_urls[0] + request.path_qs
        try:
            async with self.session.get(url) as r:
                data = await r.read()
                return web.Response(status=r.status, body=data, content_type=r.content_type)
        except Exception as e:
            return web.json_response({"error": {"message": f"{url}: {e}"}}, status=502)


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m prefixd.vllm.proxy",
        description="Disaggregated prefill/decode proxy for vLLM (prefill with max_tokens=1, then "
        "decode with the kv_transfer_params the prefill returned).",
    )
    ap.add_argument("--host", default="127.0.0.1", help="listen address [default: 127.0.0.1]")
    ap.add_argument("--port", type=int, default=9100, help="listen port [default: 9100]")
    ap.add_argument("--prefill", action="append", required=True, metavar="URL",
                    help="a prefill instance, e.g. http://127.0.0.1:7100 (repeat for several)")
    ap.add_argument("--decode", action="append", required=True, metavar="URL",
                    help="a decode instance, e.g. http://127.0.0.1:7200 (repeat for several)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per upstream request [default: 600]")
    args = ap.parse_args(argv)
    for u in args.prefill + args.decode:
        if not u.startswith(("http://", "https://")):
            ap.error(f"{u!r} is not an http:// or https:// URL")
    try:
        from aiohttp import web
    except ImportError:
        print("prefixd.vllm.proxy needs aiohttp (pip install aiohttp; vLLM installs it)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    proxy = Proxy([u.rstrip("/") for u in args.prefill], [u.rstrip("/") for u in args.decode], args.timeout)
    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/completions", proxy.handle)
    app.router.add_post("/v1/chat/completions", proxy.handle)
    app.router.add_get("/{tail:.*}", proxy.passthrough)

    async def on_startup(_):
        await proxy.start()

    async def on_cleanup(_):
        await proxy.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    log.info("proxy on %s:%d: prefill %s, decode %s", args.host, args.port, args.prefill, args.decode)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
