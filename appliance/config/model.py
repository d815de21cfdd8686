"""Typed, immutable configuration objects. Defaults are documented here and in docs/configuration.md."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MiB = 1024 * 1024
CPU = "CPU"
ALWAYS, ON_DEMAND = "always", "on_demand"
BODY_LIMIT_DEFAULT = 32 * MiB
BODY_LIMIT_MAX = 256 * MiB


@dataclass(frozen=True)
class ServerConfig:
    """The public proxy."""

    bind: tuple[str, ...] = ("127.0.0.1",)
    port: int = 8080
    workers: int = 2
    body_limit_bytes: int = BODY_LIMIT_DEFAULT
    #: Seconds until llama-server sends response headers; past that the client gets 504.
    request_timeout_s: float = 120.0
    #: Seconds in-flight requests and streams get to finish after SIGTERM.
    graceful_timeout_s: float = 30.0
    #: File with one API key per line (``name: key``, or a bare key); empty means no authentication.
    api_keys_file: str = ""
    allow_unauthenticated_lan: bool = False
    #: Bound on a request's head (request line and headers together); past it: 431, connection closed.
    max_header_bytes: int = 32 * 1024
    #: Bound on the request target (path and query); past it: 414.
    max_url_bytes: int = 8 * 1024
    #: Bound on the number of header fields; past it: 431.
    max_headers: int = 100
    #: Seconds a client has to send a complete request head once it connects (or starts its next request).
    header_timeout_s: float = 10.0
    #: Longest pause allowed while a request body arrives; past it the request ends as a client abort.
    body_idle_timeout_s: float = 30.0
    #: Open connections per worker; beyond it new connections get 503.
    max_connections_per_worker: int = 1000
    #: PEM certificate chain and private key: both set serves HTTPS on the public port.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    #: Browser origins allowed to call the API (CORS); empty sends no CORS headers at all.
    cors_allow_origins: tuple[str, ...] = ()
    #: How long a request for an on-demand model waits for it to be loaded (and for memory to load it in).
    load_timeout_s: float = 300.0
    #: An on-demand model, once loaded, keeps its memory this long while it has work, even if another model waits.
    min_residency_s: float = 30.0


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus exporter; always bound to 127.0.0.1."""

    port: int = 9464


@dataclass(frozen=True)
class LlamaServerConfig:
    binary: str = "/opt/appliance/bin/llama-server"
    allowed_binary_prefixes: tuple[str, ...] = ("/opt/appliance/bin/", "/usr/local/bin/")
    models_dir: str = "/opt/appliance/models"


@dataclass(frozen=True)
class SupervisionConfig:
    """Restart policy for llama-server children (SPEC §3)."""

    #: Failed starts in a row before a model is marked failed (FATAL) and left stopped.
    max_restarts: int = 5
    #: Uptime after which a start counts as stable and the restart budget refills.
    stable_uptime_s: int = 10
    #: First restart delay; doubles with every failed start in a row, capped at backoff_max_s.
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    #: Where the generated supervisord config, its socket and the processes' shared state live.
    runtime_dir: str = "/run/appliance"
    #: supervisord's and every program's log files; empty means <runtime_dir>/logs.
    log_dir: str = ""
    #: Durable state that outlives restarts and upgrades: the usage ledger (``usage.sqlite3``).
    state_dir: str = "/var/lib/appliance"


@dataclass(frozen=True)
class EventsConfig:
    """The event log (SPEC §5): a local JSONL file, and optionally batched POSTs to a collector."""

    #: JSONL file; empty means <supervision.runtime_dir>/events.jsonl.
    file: str = ""
    #: Size at which the file is rotated to .1, .2, ... (keeping ``backups`` old files).
    max_bytes: int = 50 * MiB
    backups: int = 5
    #: Collector URL (http or https); empty disables posting.
    url: str = ""
    #: File holding the collector's bearer token.
    token_file: str = ""
    batch_size: int = 500
    flush_interval_s: float = 1.0
    #: Events waiting per process; beyond this they are dropped and counted, never waited for.
    queue_size: int = 10000


@dataclass(frozen=True)
class ModelConfig:
    name: str
    file: str
    port: int
    kind: str = "chat"  # chat | embed | rerank
    aliases: tuple[str, ...] = ()
    ctx_size: int = 4096
    gpu_layers: int = 0
    threads: int = 2
    parallel: int = 2
    pooling: str = "mean"  # embed models only
    mmproj: str = ""  # optional multimodal projector, under models_dir
    #: llama.cpp built-in template name (e.g. "gemma", "chatml") or a .jinja file under models_dir; empty: the GGUF's.
    chat_template: str = ""
    #: Requests waiting beyond ``parallel`` on this host before 429; None means 4 x parallel.
    max_queue: int | None = None
    extra_args: tuple[str, ...] = ()
    #: "always" (loaded at start, never unloaded) or "on_demand" (loaded by the first request that needs it).
    load: str = "always"
    #: On-demand models: unloaded after this long with nothing in flight; 0: only when their memory is needed.
    idle_unload_s: float = 0.0
    #: The devices whose memory budgets ([memory]) the model counts against, by llama.cpp's names (CPU, CUDA0,
    #: Vulkan0...); empty: CPU for a model with gpu_layers = 0. The GPU devices are passed on as --device.
    devices: tuple[str, ...] = ()
    #: MiB per device, overriding the estimate from the GGUF file.
    memory_mib: dict[str, int] = field(default_factory=dict)

    @property
    def on_demand(self) -> bool:
        return self.load == ON_DEMAND

    @property
    def memory_devices(self) -> tuple[str, ...]:
        """The devices the model's memory is counted on."""
        if self.devices:
            return self.devices
        return (CPU,) if self.gpu_layers == 0 else ()

    @property
    def gpu_devices(self) -> tuple[str, ...]:
        """What llama-server gets as --device: CPU is host memory, not a llama.cpp device."""
        return tuple(d for d in self.devices if d != CPU)

    @property
    def queue_limit(self) -> int:
        """Requests in flight on this host (all workers) at which the next one gets 429."""
        return self.parallel + (self.max_queue if self.max_queue is not None else 4 * self.parallel)


#: The policy section that applies to every key without a section of its own (and to requests without keys).
DEFAULT_CLIENT = "default"


@dataclass(frozen=True)
class ClientPolicy:
    """``[clients.<name>]``: what one API key's client may do. 0 means no limit."""

    #: Names or aliases of the models the client may use (each allows its model by any of its names); None: all.
    models: tuple[str, ...] | None = None
    #: Requests in flight at once on this host; one more gets 429 at once.
    max_concurrent: int = 0
    #: Requests forwarded to a model in the last 60 s.
    requests_per_minute: int = 0
    #: Prompt plus completion tokens in the last 60 s (post-paid: the request that crosses it finishes).
    tokens_per_minute: int = 0
    #: Prompt plus completion tokens since 00:00 UTC (post-paid too).
    tokens_per_day: int = 0
    #: Share of a busy model's slots relative to other clients waiting for it.
    weight: float = 1.0

    @property
    def limited(self) -> bool:
        """Whether requests pay for the rate and budget windows (the shared counters)."""
        return bool(self.requests_per_minute or self.tokens_per_minute or self.tokens_per_day)


UNLIMITED = ClientPolicy()


@dataclass(frozen=True)
class ApplianceConfig:
    models: tuple[ModelConfig, ...]
    server: ServerConfig = field(default_factory=ServerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    llama_server: LlamaServerConfig = field(default_factory=LlamaServerConfig)
    supervision: SupervisionConfig = field(default_factory=SupervisionConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    #: Memory budget per device in MiB ([memory]); empty: no budget, memory is not planned.
    memory: dict[str, int] = field(default_factory=dict)
    #: Policies per API key name ([clients.<name>]); ``default`` covers the keys without a section.
    clients: dict[str, ClientPolicy] = field(default_factory=dict)
    source: Path | None = None

    @property
    def log_dir(self) -> Path:
        return Path(self.supervision.log_dir or Path(self.supervision.runtime_dir) / "logs")

    @property
    def events_file(self) -> Path:
        return Path(self.events.file or Path(self.supervision.runtime_dir) / "events.jsonl")

    def policy(self, client: str) -> ClientPolicy:
        return self.clients.get(client) or self.clients.get(DEFAULT_CLIENT) or UNLIMITED

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)
