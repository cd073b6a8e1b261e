"""A small Python client for the gateway's gRPC API (pdmesh.v1.Gateway).

    from pdmesh.client import Client
    with Client("127.0.0.1:50051") as c:
        for text in c.chat([{"role": "user", "content": "Hi!"}], max_tokens=32):
            print(text, end="", flush=True)

`AsyncClient` is the same over grpc.aio (`async for text in c.chat(...)`). Keyword
arguments are SamplingParams fields (max_tokens, temperature, top_p, seed, stop, ...).
Errors are grpc.RpcError with the gateway's status and message. A gateway serving TLS
(--tls-cert): `Client(addr, tls_ca="ca.pem")` (or `tls=True` for the system's roots).
"""
from __future__ import annotations

from typing import Any, AsyncIterator, Iterator, Sequence

import grpc
from google.protobuf import struct_pb2

from pdmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, openai_pb2


def _sampling(params: dict[str, Any]) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(**params)


def _chat_request(messages: Sequence[dict[str, str]], model: str,
                  params: dict[str, Any]) -> gateway_pb2.ChatRequest:
    msgs = [openai_pb2.ChatMessage(role=m["role"], name=m.get("name", ""),
                                   content=struct_pb2.Value(string_value=m["content"]))
            for m in messages]
    return gateway_pb2.ChatRequest(model=model, messages=msgs, sampling_params=_sampling(params))


def _generate_request(prompt: str | Sequence[int], model: str,
                      params: dict[str, Any]) -> gateway_pb2.GenerateRequest:
    if isinstance(prompt, str):
        return gateway_pb2.GenerateRequest(model=model, text=prompt, return_text=True,
                                           sampling_params=_sampling(params))
    return gateway_pb2.GenerateRequest(model=model, token_ids=list(prompt), return_text=True,
                                       sampling_params=_sampling(params))


def _one_choice(params: dict) -> None:
    """chat()/generate() yield one text: n > 1 would interleave the choices' deltas."""
    if params.get("n", 1) != 1:
        raise ValueError("chat()/generate() yield one choice's text; for n > 1 use "
                         "chat_stream()/generate_stream() and each message's `index`")


def _credentials(tls: bool, tls_ca: str | None) -> grpc.ChannelCredentials | None:
    """TLS credentials verifying the gateway against `tls_ca` (a PEM file) or, with only
    `tls`, the system's roots; None: plaintext."""
    if tls_ca:
        with open(tls_ca, "rb") as f:
            return grpc.ssl_channel_credentials(root_certificates=f.read())
    return grpc.ssl_channel_credentials() if tls else None


def _metadata(api_key: str | None):
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


class Client:
    """Synchronous client; `chat`/`generate` yield text deltas, `*_stream` the raw
    GenerateResponse messages (token ids, logprobs, finish_reason, usage)."""

    def __init__(self, address: str, api_key: str | None = None, model: str = "",
                 tls: bool = False, tls_ca: str | None = None) -> None:
        creds = _credentials(tls, tls_ca)
        self._channel = grpc.secure_channel(address, creds) if creds else \
            grpc.insecure_channel(address)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self._md, self.model = _metadata(api_key), model

    def chat_stream(self, messages, **params) -> Iterator[gateway_pb2.GenerateResponse]:
        return self._stub.Chat(_chat_request(messages, self.model, params), metadata=self._md)

    def generate_stream(self, prompt, **params) -> Iterator[gateway_pb2.GenerateResponse]:
        return self._stub.Generate(_generate_request(prompt, self.model, params),
                                   metadata=self._md)

    def chat(self, messages, **params) -> Iterator[str]:
        """Text deltas of the assistant's reply to `messages` ([{"role", "content"}])."""
        _one_choice(params)
        for r in self.chat_stream(messages, **params):
            if r.text:
                yield r.text

    def generate(self, prompt: str | Sequence[int], **params) -> Iterator[str]:
        """Text deltas continuing `prompt` (text or token ids; no chat template)."""
        _one_choice(params)
        for r in self.generate_stream(prompt, **params):
            if r.text:
                yield r.text

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """asyncio client over grpc.aio; same methods as Client, as async iterators."""

    def __init__(self, address: str, api_key: str | None = None, model: str = "",
                 tls: bool = False, tls_ca: str | None = None) -> None:
        creds = _credentials(tls, tls_ca)
        self._channel = grpc.aio.secure_channel(address, creds) if creds else \
            grpc.aio.insecure_channel(address)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self._md, self.model = _metadata(api_key), model

    def chat_stream(self, messages, **params) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        return self._stub.Chat(_chat_request(messages, self.model, params), metadata=self._md)

    def generate_stream(self, prompt, **params) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        return self._stub.Generate(_generate_request(prompt, self.model, params),
                                   metadata=self._md)

    async def chat(self, messages, **params) -> AsyncIterator[str]:
        """Text deltas of the assistant's reply to `messages`."""
        _one_choice(params)
        async for r in self.chat_stream(messages, **params):
            if r.text:
                yield r.text

    async def generate(self, prompt, **params) -> AsyncIterator[str]:
        """Text deltas continuing `prompt` (text or token ids)."""
        _one_choice(params)
        async for r in self.generate_stream(prompt, **params):
            if r.text:
                yield r.text

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
