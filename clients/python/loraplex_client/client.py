"""Typed sync (`Client`) and asyncio (`AsyncClient`) clients of a loraplex server.

    with Client("localhost:50051") as c:
        print(c.generate("Hello", adapter="sql", max_new_tokens=32).text)
        for chunk in c.stream("Hello", adapter="sql"):
            print(chunk.text, end="", flush=True)

Every call sends the metadata `x-loraplex-adapter: <adapter>` (for adapter-aware
proxies) and `authorization: Bearer <token>` when a token is given. Failed calls
raise a `loraplex_client.errors.LoraplexError` subclass carrying the status code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex_client._proto.loraplex.v1 import loraplex_pb2 as pb
from loraplex_client._proto.loraplex.v1 import loraplex_pb2_grpc as pb_grpc
from loraplex_client.errors import from_rpc_error
from loraplex_client.types import (AdapterInfo, Chunk, Result, RouteInfo, Tokens,
                                   adapter_from_pb, build_generate_request,
                                   build_set_route_request, build_tokenize_request,
                                   chunk_from_pb, result_from_pb, route_from_pb, tokens_from_pb)

ADAPTER_HEADER = "x-loraplex-adapter"


def _credentials(tls) -> grpc.ChannelCredentials | None:
    """tls: False/None = plaintext; True = system roots; str/bytes = a PEM root
    certificate (path or contents); or ready grpc.ChannelCredentials."""
    if not tls:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    if isinstance(tls, grpc.ChannelCredentials):
        return tls
    if isinstance(tls, str):
        with open(tls, "rb") as f:
            tls = f.read()
    return grpc.ssl_channel_credentials(root_certificates=tls)


def _merge_request(name, sources, weights, combination_type, density, majority_sign_method,
                   svd_rank, seed) -> pb.MergeAdaptersRequest:
    weights = [1.0] * len(sources) if weights is None else list(weights)
    req = pb.MergeAdaptersRequest(name=name, sources=list(sources), weights=weights,
                                  combination_type=combination_type, density=density,
                                  majority_sign_method=majority_sign_method, svd_rank=svd_rank)
    if seed is not None:
        req.seed = seed
    return req


class _Base:
    def __init__(self, token: str | None):
        self._token = token

    def _metadata(self, adapter: str) -> tuple[tuple[str, str], ...]:
        md = [(ADAPTER_HEADER, adapter or "")]
        if self._token:
            md.append(("authorization", f"Bearer {self._token}"))
        return tuple(md)


class GenerateStream:
    """Iterator of `Chunk`s of one streaming call. `cancel()` (or leaving a `with`
    block, or closing the iterator) cancels the call on the server. So does dropping
    the iterator `iter(stream)` before the end: keep it while the call should run."""

    def __init__(self, call):
        self._call = call

    def __iter__(self) -> Iterator[Chunk]:
        try:
            for msg in self._call:
                yield chunk_from_pb(msg)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            self._call.cancel()

    def cancel(self) -> None:
        self._call.cancel()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cancel()


class Client(_Base):
    """Blocking client. `target` is "host:port"; `timeout` (seconds) is the default
    deadline of every call (None = none)."""

    def __init__(self, target: str, token: str | None = None, tls=False,
                 timeout: float | None = None, options: Sequence[tuple[str, object]] = ()):
        super().__init__(token)
        creds = _credentials(tls)
        self._channel = (grpc.secure_channel(target, creds, options=options) if creds
                         else grpc.insecure_channel(target, options=options))
        self._gen = pb_grpc.GenerationStub(self._channel)
        self._adm = pb_grpc.AdaptersStub(self._channel)
        self._routes = pb_grpc.RoutesStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._timeout = timeout

    def _call(self, method, request, adapter: str, timeout):
        try:
            return method(request, metadata=self._metadata(adapter),
                          timeout=self._timeout if timeout is None else timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def generate(self, prompt: str | None = None, *, input_ids: Sequence[int] | None = None,
                 messages=None, adapter: str = "", timeout: float | None = None,
                 **sampling) -> Result:
        """Whole completion. sampling: max_new_tokens, temperature, top_p, top_k, min_p,
        seed, repetition_penalty, presence_penalty, frequency_penalty, min_tokens, stop,
        include_stop_str_in_output (the stop string ends the text), stop_token_ids,
        bad_words (words the output must not contain), ignore_eos, keep_special_tokens (in the text), logprobs, top_logprobs,
        prompt_logprobs, logit_bias ({token id: bias}), allowed_token_ids, guided_regex (the output fully matches it),
        guided_choice (the output is one of these strings), guided_json (a JSON schema,
        as a dict or its text: the output is JSON it allows), n (completions of the prompt:
        all in Result.completions, completion 0's also on top); also routing_key,
        priority (lower is served first), add_special_tokens (False: a prompt gets no
        BOS or other special tokens added), truncate_prompt_tokens (keep the input's last
        this many tokens) and, with messages, tools (shown to the model through the chat
        template), continue_final_message and chat_template_kwargs (see
        types.chat_messages); see loraplex.proto."""
        req = build_generate_request(prompt, input_ids=input_ids, messages=messages,
                                     adapter=adapter, **sampling)
        return result_from_pb(self._call(self._gen.Generate, req, adapter, timeout))

    def stream(self, prompt: str | None = None, *, input_ids: Sequence[int] | None = None,
               messages=None, adapter: str = "", timeout: float | None = None,
               **sampling) -> GenerateStream:
        """Like generate, but yields `Chunk`s as tokens are produced (with n > 1, the
        completions' chunks interleave; `Chunk.index` tells them apart)."""
        req = build_generate_request(prompt, input_ids=input_ids, messages=messages,
                                     adapter=adapter, **sampling)
        call = self._gen.GenerateStream(req, metadata=self._metadata(adapter),
                                        timeout=self._timeout if timeout is None else timeout)
        return GenerateStream(call)

    def tokenize(self, prompt: str | None = None, *, messages=None, tools=None,
                 timeout: float | None = None, **chat) -> Tokens:
        """The token ids Generate would see for this prompt (with the tokenizer's special
        tokens unless add_special_tokens=False) or these chat messages and tools (through
        the chat template; chat: continue_final_message, chat_template_kwargs, see
        types.chat_messages)."""
        req = build_tokenize_request(prompt, messages=messages, tools=tools, **chat)
        return tokens_from_pb(self._call(self._gen.Tokenize, req, "", timeout))

    def detokenize(self, token_ids: Sequence[int], timeout: float | None = None) -> str:
        """The text of these token ids, decoded on their own (special tokens left out; a
        SentencePiece tokenizer may drop a leading space that Generate's text has)."""
        req = pb.TokenIds(ids=[int(t) for t in token_ids])
        return self._call(self._gen.Detokenize, req, "", timeout).text

    def list_adapters(self, name: str = "", timeout: float | None = None) -> list[AdapterInfo]:
        resp = self._call(self._adm.ListAdapters, pb.ListAdaptersRequest(name=name), name, timeout)
        return [adapter_from_pb(a) for a in resp.adapters]

    def load_adapter(self, name: str, path: str = "", timeout: float | None = None) -> AdapterInfo:
        return adapter_from_pb(self._call(
            self._adm.LoadAdapter, pb.LoadAdapterRequest(name=name, path=path), name, timeout))

    def unload_adapter(self, name: str, drain: bool = False,
                       timeout: float | None = None) -> list[AdapterInfo]:
        resp = self._call(self._adm.UnloadAdapter,
                          pb.UnloadAdapterRequest(name=name, drain=drain), name, timeout)
        return [adapter_from_pb(a) for a in resp.unloaded]

    def swap_adapter(self, name: str, path: str, timeout: float | None = None) -> AdapterInfo:
        return adapter_from_pb(self._call(
            self._adm.SwapAdapter, pb.SwapAdapterRequest(name=name, path=path), name, timeout))

    def merge_adapters(self, name: str, sources: Sequence[str],
                       weights: Sequence[float] | None = None, combination_type: str = "linear",
                       density: float = 0.0, majority_sign_method: str = "", svd_rank: int = 0,
                       seed: int | None = None, timeout: float | None = None) -> AdapterInfo:
        req = _merge_request(name, sources, weights, combination_type, density,
                             majority_sign_method, svd_rank, seed)
        return adapter_from_pb(self._call(self._adm.MergeAdapters, req, name, timeout))

    # ---- routes (admin token) ----------------------------------------------------

    def set_route(self, alias: str, targets, shadow=None, guard=None,
                  timeout: float | None = None) -> RouteInfo:
        """targets: {"name@version": weight} (or "name" = its current version);
        shadow: ("name@version", fraction); guard: dict of max_error_rate,
        max_latency_ratio, max_disagreement, window."""
        req = build_set_route_request(alias, targets, shadow, guard)
        return route_from_pb(self._call(self._routes.SetRoute, req, "", timeout))

    def get_route(self, alias: str, timeout: float | None = None) -> RouteInfo:
        return route_from_pb(self._call(self._routes.GetRoute, pb.GetRouteRequest(alias=alias),
                                        "", timeout))

    def list_routes(self, timeout: float | None = None) -> list[RouteInfo]:
        resp = self._call(self._routes.ListRoutes, pb.ListRoutesRequest(), "", timeout)
        return [route_from_pb(r) for r in resp.routes]

    def delete_route(self, alias: str, timeout: float | None = None) -> RouteInfo:
        return route_from_pb(self._call(self._routes.DeleteRoute,
                                        pb.DeleteRouteRequest(alias=alias), "", timeout))

    def promote_route(self, alias: str, adapter: str = "",
                      timeout: float | None = None) -> RouteInfo:
        return route_from_pb(self._call(self._routes.PromoteRoute,
                                        pb.PromoteRouteRequest(alias=alias, adapter=adapter), "",
                                        timeout))

    def rollback_route(self, alias: str, timeout: float | None = None) -> RouteInfo:
        return route_from_pb(self._call(self._routes.RollbackRoute,
                                        pb.RollbackRouteRequest(alias=alias), "", timeout))

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """"SERVING", "NOT_SERVING", ... of the whole server ("") or of one service
        (e.g. "loraplex.v1.Generation")."""
        resp = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service),
                          "", timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncClient(_Base):
    """asyncio client with the same methods as `Client` (as coroutines; `stream`
    returns an async iterator)."""

    def __init__(self, target: str, token: str | None = None, tls=False,
                 timeout: float | None = None, options: Sequence[tuple[str, object]] = ()):
        super().__init__(token)
        creds = _credentials(tls)
        self._channel = (grpc.aio.secure_channel(target, creds, options=options) if creds
                         else grpc.aio.insecure_channel(target, options=options))
        self._gen = pb_grpc.GenerationStub(self._channel)
        self._adm = pb_grpc.AdaptersStub(self._channel)
        self._routes = pb_grpc.RoutesStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._timeout = timeout

    async def _call(self, method, request, adapter: str, timeout):
        try:
            return await method(request, metadata=self._metadata(adapter),
                                timeout=self._timeout if timeout is None else timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    async def generate(self, prompt: str | None = None, *, input_ids=None, messages=None,
                       adapter: str = "", timeout: float | None = None, **sampling) -> Result:
        req = build_generate_request(prompt, input_ids=input_ids, messages=messages,
                                     adapter=adapter, **sampling)
        return result_from_pb(await self._call(self._gen.Generate, req, adapter, timeout))

    async def stream(self, prompt: str | None = None, *, input_ids=None, messages=None,
                     adapter: str = "", timeout: float | None = None,
                     **sampling) -> AsyncIterator[Chunk]:
        """Async generator of `Chunk`s; closing it (or breaking out) cancels the call."""
        req = build_generate_request(prompt, input_ids=input_ids, messages=messages,
                                     adapter=adapter, **sampling)
        call = self._gen.GenerateStream(req, metadata=self._metadata(adapter),
                                        timeout=self._timeout if timeout is None else timeout)
        try:
            async for msg in call:
                yield chunk_from_pb(msg)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()

    async def tokenize(self, prompt: str | None = None, *, messages=None, tools=None,
                       timeout: float | None = None, **chat) -> Tokens:
        req = build_tokenize_request(prompt, messages=messages, tools=tools, **chat)
        return tokens_from_pb(await self._call(self._gen.Tokenize, req, "", timeout))

    async def detokenize(self, token_ids: Sequence[int], timeout: float | None = None) -> str:
        req = pb.TokenIds(ids=[int(t) for t in token_ids])
        return (await self._call(self._gen.Detokenize, req, "", timeout)).text

    async def list_adapters(self, name: str = "", timeout: float | None = None) -> list[AdapterInfo]:
        resp = await self._call(self._adm.ListAdapters, pb.ListAdaptersRequest(name=name), name,
                                timeout)
        return [adapter_from_pb(a) for a in resp.adapters]

    async def load_adapter(self, name: str, path: str = "",
                           timeout: float | None = None) -> AdapterInfo:
        return adapter_from_pb(await self._call(
            self._adm.LoadAdapter, pb.LoadAdapterRequest(name=name, path=path), name, timeout))

    async def unload_adapter(self, name: str, drain: bool = False,
                             timeout: float | None = None) -> list[AdapterInfo]:
        resp = await self._call(self._adm.UnloadAdapter,
                                pb.UnloadAdapterRequest(name=name, drain=drain), name, timeout)
        return [adapter_from_pb(a) for a in resp.unloaded]

    async def swap_adapter(self, name: str, path: str,
                           timeout: float | None = None) -> AdapterInfo:
        return adapter_from_pb(await self._call(
            self._adm.SwapAdapter, pb.SwapAdapterRequest(name=name, path=path), name, timeout))

    async def merge_adapters(self, name: str, sources: Sequence[str],
                             weights: Sequence[float] | None = None,
                             combination_type: str = "linear", density: float = 0.0,
                             majority_sign_method: str = "", svd_rank: int = 0,
                             seed: int | None = None, timeout: float | None = None) -> AdapterInfo:
        req = _merge_request(name, sources, weights, combination_type, density,
                             majority_sign_method, svd_rank, seed)
        return adapter_from_pb(await self._call(self._adm.MergeAdapters, req, name, timeout))

    # ---- routes (admin token) ----------------------------------------------------

    async def set_route(self, alias: str, targets, shadow=None, guard=None,
                  timeout: float | None = None) -> RouteInfo:
        """targets: {"name@version": weight} (or "name" = its current version);
        shadow: ("name@version", fraction); guard: dict of max_error_rate,
        max_latency_ratio, max_disagreement, window."""
        req = build_set_route_request(alias, targets, shadow, guard)
        return route_from_pb(await self._call(self._routes.SetRoute, req, "", timeout))

    async def get_route(self, alias: str, timeout: float | None = None) -> RouteInfo:
        return route_from_pb(await self._call(self._routes.GetRoute, pb.GetRouteRequest(alias=alias),
                                        "", timeout))

    async def list_routes(self, timeout: float | None = None) -> list[RouteInfo]:
        resp = await self._call(self._routes.ListRoutes, pb.ListRoutesRequest(), "", timeout)
        return [route_from_pb(r) for r in resp.routes]

    async def delete_route(self, alias: str, timeout: float | None = None) -> RouteInfo:
        return route_from_pb(await self._call(self._routes.DeleteRoute,
                                        pb.DeleteRouteRequest(alias=alias), "", timeout))

    async def promote_route(self, alias: str, adapter: str = "",
                      timeout: float | None = None) -> RouteInfo:
        return route_from_pb(await self._call(self._routes.PromoteRoute,
                                        pb.PromoteRouteRequest(alias=alias, adapter=adapter), "",
                                        timeout))

    async def rollback_route(self, alias: str, timeout: float | None = None) -> RouteInfo:
        return route_from_pb(await self._call(self._routes.RollbackRoute,
                                        pb.RollbackRouteRequest(alias=alias), "", timeout))

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        resp = await self._call(self._health.Check,
                                health_pb2.HealthCheckRequest(service=service), "", timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
