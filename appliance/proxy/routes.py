"""Which llama-server routes the proxy serves, and which it deliberately does not.

Every served route is forwarded the same way (``forward.Forward``): the body's ``"model"`` picks the configured model,
the bytes go to the same path on that model's llama-server, and the answer comes back verbatim. Serving one more
llama-server route is one line in ``ROUTES``.
"""

from __future__ import annotations

from dataclasses import dataclass

CHAT = ("chat",)
ANY_KIND = ("chat", "embed", "rerank")


@dataclass(frozen=True)
class Route:
    #: The path clients call and llama-server serves (forwarded unchanged).
    path: str
    #: Model kinds that can serve it; a body without ``"model"`` goes to the first configured model of ``kinds[0]``.
    kinds: tuple[str, ...]
    #: What the route table in docs/api.md says about it.
    doc: str


ROUTES: tuple[Route, ...] = (
    Route("/v1/chat/completions", CHAT, "OpenAI chat completions (streaming with `\"stream\": true`)"),
    Route("/v1/completions", CHAT, "OpenAI text completions"),
    Route("/v1/embeddings", ("embed",), "OpenAI embeddings"),
    Route("/v1/responses", CHAT, "OpenAI Responses API (streaming events included)"),
    Route("/v1/responses/input_tokens", CHAT, "Responses API: count a request's input tokens"),
    Route("/v1/chat/completions/input_tokens", CHAT, "count a chat request's input tokens"),
    Route("/v1/messages", CHAT, "Anthropic Messages API (streaming included)"),
    Route("/v1/messages/count_tokens", CHAT, "Anthropic: count a request's tokens"),
    Route("/v1/rerank", ("rerank",), "rerank documents against a query (Jina/Cohere shape)"),
    Route("/v1/reranking", ("rerank",), "same as /v1/rerank"),
    Route("/rerank", ("rerank",), "same as /v1/rerank"),
    # Without the /v1 prefix, as llama-server serves them: clients configured with a bare host URL work. Note that
    # llama-server's /completions and /embeddings are its native forms, not the OpenAI ones.
    Route("/chat/completions", CHAT, "same as /v1/chat/completions"),
    Route("/completions", CHAT, "llama-server's native completion"),
    Route("/embeddings", ("embed",), "llama-server's native embeddings"),
    Route("/responses", CHAT, "same as /v1/responses"),
    Route("/chat/completions/input_tokens", CHAT, "same as /v1/chat/completions/input_tokens"),
    Route("/responses/input_tokens", CHAT, "same as /v1/responses/input_tokens"),
    Route("/reranking", ("rerank",), "same as /v1/rerank"),
    # llama-server's native routes, for editor plugins and tools.
    Route("/completion", CHAT, "llama-server's native completion (its original name, which many llama.cpp tools call)"),
    Route("/embedding", ("embed",), "llama-server's native embeddings (its original name)"),
    Route("/infill", CHAT, "fill-in-the-middle for code editors"),
    Route("/tokenize", ANY_KIND, "text to tokens with the model's tokenizer"),
    Route("/detokenize", ANY_KIND, "tokens to text"),
    Route("/apply-template", CHAT, "the prompt the model's chat template makes of a message list"),
)

#: The Anthropic Messages API's routes: under this prefix, the proxy's own errors are in Anthropic's shape.
ANTHROPIC_PREFIX = "/v1/messages"


def is_anthropic(path: str) -> bool:
    """Whether ``path`` is one of Anthropic's routes, or an unknown path under them (an Anthropic client's typo)."""
    return path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/")


#: GET only (``forward.Props``): the model's settings; POST /props is refused.
PROPS = Route("/props", ANY_KIND, "the model's settings (context size, chat template, ...), read-only; `?model=NAME`")

#: llama-server routes that answer 404 here, and why: each changes a child's state or shows other clients' data.
UNEXPOSED: dict[str, str] = {
    "/slots": "it shows the prompts of other clients",
    "/slots/{slot_id}": "it saves, restores or erases other clients' cached prompts",
    "/models/load": "models are loaded by the operator's configuration",
    "/models/unload": "models are loaded by the operator's configuration",
    "/lora-adapters": "POST /lora-adapters changes the model for every client",
    "/cors-proxy": "it fetches arbitrary URLs from this host",
    "/metrics": "metrics are served to Prometheus on loopback only",
    "/v1/chat/completions/control": "it controls other clients' generations",
    "/tools": "it runs shell commands, reads and writes files and starts MCP servers on this host",
    "/predict": "Vertex AI's route, which llama-server serves only inside a Vertex AI container",
}
