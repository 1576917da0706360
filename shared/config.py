"""The one settings class: every `INPAINT_*` variable is read here."""

from __future__ import annotations

import base64
import os
import secrets
import tempfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_ACCESS_KEY = "inpaintdev"
DEV_SECRET_KEY = "inpaintdevsecret"  # noqa: S105 - the documented development credential
PLACEHOLDER = "CHANGE"  # what .env.example puts where a secret goes
TOY_MODELS = ("tiny-random", "tiny-random-sdxl", "tiny-random-flux", "classical", "sim")  # shared.catalog: `toy`
WEBHOOK_TIMEOUT_MAX_S = 20.0  # the bound of INPAINT_WEBHOOK_TIMEOUT_S


class Settings(BaseSettings):
    """Service configuration, environment variables with the `INPAINT_` prefix."""

    model_config = SettingsConfigDict(env_prefix="INPAINT_", extra="ignore")

    # development: a laptop; test: the suite (the only one that honours fault injection); production:
    # refuses development credentials, placeholders, toy models, open auth and test hooks.
    environment: Literal["development", "test", "production"] = "development"
    data_dir: Path = Path(".inpaint")

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    public_url: str = ""  # how clients reach the API: the base of absolute URLs in answers (a file's `urls.get`)

    redis_url: str = "redis://127.0.0.1:6379/0"
    # The Redis `inpaint up` runs: everysec may lose the last second of acknowledged submits on a crash,
    # always loses none (an fsync per write). See docs/reliability.md.
    redis_appendfsync: Literal["everysec", "always"] = "everysec"
    # High availability: Sentinels (host:port, comma-separated) that name the primary of `redis_master`;
    # set, every process follows the primary across a failover, and the URL above gives only the
    # password and the database (its host is not used). Empty: the one Redis of `redis_url`.
    redis_sentinels: str = ""
    redis_master: str = "inpaint"
    redis_sentinel_password: str = ""  # the Sentinels' own (`requirepass` on each Sentinel), if they have one
    # Replicas that must hold a write before the service acknowledges it (a 202, a status a client can
    # read): Redis `WAIT` after each such write, up to `redis_wait_timeout_ms`; a write not held by that
    # many in time is answered 503 (submits) or retried (workers). 0: no wait (one Redis, or accepting
    # that a failover may lose the last writes).
    redis_wait_replicas: int = Field(0, ge=0, le=8)
    # Below the 1.5 s socket timeout of a Redis call (shared.db), which a longer WAIT would run into.
    redis_wait_timeout_ms: int = Field(500, ge=10, le=1000)

    s3_endpoint_url: str = "http://127.0.0.1:8333"
    s3_bucket: str = "inpaint"
    s3_access_key_id: str = DEV_ACCESS_KEY
    s3_secret_access_key: str = DEV_SECRET_KEY
    s3_region: str = "us-east-1"
    s3_public_endpoint_url: str = ""  # where clients reach S3 for presigned URLs; empty: the endpoint above
    # path (SeaweedFS, MinIO, most S3-compatible servers), virtual (bucket.host: AWS's preference), auto
    s3_addressing_style: Literal["path", "virtual", "auto"] = "path"
    # botocore's retry mode for throttling and 5xx: standard, or adaptive (also slows the client down)
    s3_retry_mode: Literal["standard", "adaptive"] = "standard"
    # Encryption at rest of every object written: none, AES256 (SSE-S3) or aws:kms (SSE-KMS, with the key below
    # or the bucket's default KMS key)
    s3_sse: Literal["none", "AES256", "aws:kms"] = "none"
    s3_sse_kms_key_id: str = ""
    presign_expires_s: int = Field(3600, ge=60, le=7 * 24 * 3600)

    model: str = "auto"  # the model this worker serves (a catalog name or id, `auto`, or a diffusers directory)
    # The deployment's models, comma-separated, its default first (shared.catalog); empty: INPAINT_MODEL's alone.
    models: str = ""
    accept_licenses: str = ""  # models whose licence restricts use (FLUX.1 Fill [dev]) are served once named here
    # LoRA adapters: the largest file; what a worker keeps on disk and in memory (least recent out first)
    lora_max_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    lora_disk_cache_bytes: int = Field(4 * 1024**3, ge=0)
    lora_memory_slots: int = Field(8, ge=1, le=256)
    device: Literal["auto", "cuda", "cpu"] = "auto"
    hf_cache_dir: Path | None = None

    # keys: every request needs a valid key (none configured: nobody gets in); none: open single-user
    # mode, every caller is tenant `default`. Never inferred from what Redis holds.
    auth: Literal["keys", "none"] = "keys"
    api_keys: str = ""
    webhook_secret: str = ""  # the signing secret of the open mode (INPAINT_AUTH=none) only
    webhook_rotation_overlap_s: int = Field(86400, ge=0)  # a rotated tenant secret keeps signing this long
    # Encrypts tenant webhook secrets at rest (Fernet keys, space-separated: the first encrypts, all
    # decrypt, so the key can be rotated). Generated into the data dir outside production.
    secrets_key: str = ""
    webhook_allow_private: bool = False
    # Seconds before each retry after a failed delivery; the default spans more than a day.
    webhook_retry_schedule_s: str = "5,30,120,600,1800,3600,7200,14400,28800,43200"
    # An attempt's deadline. With the DNS lookup before it (dns_timeout_s, ≤ 30) it stays well inside its
    # claim's 60 s lease (shared/jobs/deliveries.py): past the lease a second attempt sends it again.
    webhook_timeout_s: float = Field(10.0, gt=0, le=WEBHOOK_TIMEOUT_MAX_S)
    # Of an I/O worker process's threads, the share one tenant's attempts may hold (at least one); its
    # attempts past it wait in Redis, so one tenant's hanging receivers cannot hold every thread.
    webhook_tenant_share: float = Field(0.25, gt=0, le=1)

    max_upload_bytes: int = Field(20_000_000, ge=1024)
    max_pixels: int = Field(4_194_304, ge=64)
    max_queued_jobs: int = Field(10_000, ge=1)
    score_timeout_s: float = Field(300.0, gt=0)  # POST /score waits this long, then 504 with the job ids

    # Inputs and outputs expire this long after the job ends (0: kept); the job's record stays.
    retention_s: int = Field(0, ge=0)
    job_ttl_s: int = Field(7 * 24 * 3600, ge=60)  # finished jobs stay in Redis this long; S3 keeps them after
    job_soft_time_limit_s: int = Field(600, ge=1)
    job_time_limit_s: int = Field(660, ge=2)
    job_max_attempts: int = Field(3, ge=1)
    worker_heartbeat_s: float = Field(5.0, gt=0)
    # Broker redelivery of unacknowledged messages: default above the hard time limit. The job
    # lease makes an early redelivery harmless (the copy waits), so tests may set it low.
    broker_visibility_timeout_s: int | None = Field(None, ge=1)
    broker_restore_interval_s: int = Field(10, ge=1)
    max_queued_per_tenant: int = Field(1000, ge=1)
    # Shares of the GPUs under contention, `tenant:weight,…` (others weigh 1): a tenant of weight 2
    # gets twice the rows of a tenant of weight 1 while both have jobs waiting.
    tenant_weights: str = ""
    # What one tenant may hold of what every tenant shares (each answers 429 with Retry-After).
    max_open_batches_per_tenant: int = Field(10, ge=1)
    max_batch_rows: int = Field(100_000, ge=1)  # rows per batch (inline: 413 at submit; a file: fails there)
    # Connections a tenant holds open at once, across API replicas: event streams and waits (`Prefer:
    # wait`, /v1/images/edits, /score) share it; the name predates the waits.
    max_streams_per_tenant: int = Field(20, ge=1)
    max_redeliveries_per_minute: int = Field(30, ge=1)
    # Uploaded files (`/v1/files`): each expires this long after its upload (Replicate's: a day); a tenant
    # holds at most this many at once.
    file_ttl_s: int = Field(86400, ge=1)
    max_files_per_tenant: int = Field(1000, ge=1)
    max_loras_per_tenant: int = Field(200, ge=1)  # adapters a tenant holds (uploaded or by URL)
    batch_max_step_errors: int = Field(30, ge=1)  # failed steps in a row before a batch fails
    dns_timeout_s: float = Field(2.0, gt=0, le=30)  # resolving a webhook or image host (then 503, retryable)
    # Lookups of one process at once, and how many of them one tenant's may hold, counting lookups still
    # running after their caller gave up: a DNS server that never answers costs its tenant only its share.
    dns_concurrency: int = Field(64, ge=1, le=1024)
    dns_tenant_share: int = Field(4, ge=1, le=1024)
    # Ports a webhook or image URL may name (80 too where http:// is allowed); the allow-private flags,
    # test-only, lift it.
    outbound_ports: str = "443,8443"
    # Images given as https:// URLs: fetched at submit within this time; private addresses only for tests.
    fetch_timeout_s: float = Field(10.0, gt=0, le=60)
    fetch_allow_private: bool = False
    # The API's pool for image URLs (apart from the threads that serve requests), and how many of its
    # slots one tenant's fetches may hold at once; the rest wait for their turn.
    fetch_concurrency: int = Field(16, ge=1, le=1024)
    fetch_tenant_share: int = Field(4, ge=1, le=1024)
    fetch_ca_file: str = ""  # a PEM bundle to trust instead of the system's (a private CA; tests)
    # Cross-job batching: rows (outputs) per pipeline call at 512×512, scaled down for larger images.
    # 0 = auto: from the card's free memory on CUDA (at most 32), 4 on a CPU. 1 turns batching off.
    batch_max_size: int = Field(0, ge=0, le=256)
    # The `sim` model (benchmarks and tests of the fleet, never production): no compute, each pipeline
    # call holds its worker this long whatever its rows, and answers the input image as every output.
    sim_call_ms: int = Field(500, ge=0, le=600_000)
    # The square a `crop_to_mask` job is inpainted at: the model's native size (SD2-inpainting: 512).
    crop_size: int = Field(512, ge=64, le=2048, multiple_of=8)
    # 0: a leader takes the compatible jobs already waiting and starts at once (micro-batches grow from
    # what arrives while the previous call runs). Above 0: it may also wait this long for more mates.
    batch_window_ms: float = Field(0.0, ge=0, le=5000)
    # CUDA only: channels_last, fused QKV projections and cuDNN autotuning (the plain path when off).
    cuda_fast: bool = True
    # CUDA only: torch.compile of the UNet and VAE decoder for the sizes below, every batch bucket
    # warmed before the worker reports ready; other sizes run eagerly, never recompiling.
    compile: Literal["off", "default", "reduce-overhead"] = "reduce-overhead"
    # CUDA: fp16 (the model's half precision), or fp8 (opt-in: the UNet's large linears in float8 with
    # per-tensor scales; needs compute capability ≥ 8.9 and torchao; workers.models.precision)
    precision: Literal["fp16", "fp8"] = "fp16"
    # CUDA: where compiled kernels are kept between worker starts (empty: off); workers.models.compile_cache
    compile_cache_dir: str = ""
    compile_sizes: str = "512x512"
    compile_vae: bool = True
    # Safety policy over every output (workers/safety.py): none (the card's: nsfw null), flag, blur, block.
    safety: Literal["none", "flag", "blur", "block"] = "none"
    safety_checker: str = "CompVis/stable-diffusion-safety-checker"  # a local dir, a cached repo id, or tiny-random
    log_format: Literal["text", "json"] = "text"  # json: one object per line, with the job id
    # Each worker process serves its own Prometheus metrics here (0: off); the API serves /metrics.
    worker_metrics_port: int = Field(9100, ge=0, le=65535)
    webhooks_metrics_port: int = Field(9101, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"  # compose and Kubernetes set 0.0.0.0 so Prometheus can scrape
    # Set: the API's /metrics and the detail of /readyz need `Authorization: Bearer <token>`. Unset: both
    # are open outside production (a laptop, the suite); in production /metrics is 404, /readyz says only
    # ready or not.
    metrics_token: str = ""
    # Test hook: prompts like `__fault:kill__` make the worker misbehave on purpose. Never in production.
    fault_injection: bool = False
    warmup: bool = True

    @field_validator("tenant_weights")
    @classmethod
    def _weights(cls, v: str) -> str:
        """Refused at start, not at a submit: a weight that is not a positive number is a 500 there."""
        for item in filter(None, (p.strip() for p in v.split(","))):
            name, sep, value = item.partition(":")
            try:
                ok = bool(sep and name) and float(value) > 0
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"INPAINT_TENANT_WEIGHTS: {item!r} is not tenant:weight with a weight above 0")
        return v

    @field_validator("s3_endpoint_url")
    @classmethod
    def _strip_slash(cls, v: str) -> str:
        return v.rstrip("/")

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.redis_sentinels and self.redis_url.startswith("rediss://"):
            raise ValueError("INPAINT_REDIS_SENTINELS with a rediss:// URL: TLS through Sentinels is not supported")
        for key in self.secrets_key.split():
            try:
                valid = len(base64.urlsafe_b64decode(key.encode())) == 32
            except ValueError:
                valid = False
            if not valid:
                raise ValueError("INPAINT_SECRETS_KEY: each key is url-safe base64 of 32 bytes (Fernet.generate_key())")
        self.outbound_port_list()
        if self.job_time_limit_s <= self.job_soft_time_limit_s:
            raise ValueError("INPAINT_JOB_TIME_LIMIT_S must be above INPAINT_JOB_SOFT_TIME_LIMIT_S")
        if self.environment == "production":
            self._check_production()
        return self

    def _check_production(self) -> None:
        if self.s3_secret_access_key == DEV_SECRET_KEY:
            raise ValueError("refusing the development S3 secret in production")
        if self.auth == "none":
            raise ValueError("INPAINT_AUTH=none (open, no keys) is refused in production")
        if not self.secrets_key:
            raise ValueError("INPAINT_SECRETS_KEY must be set in production (it encrypts webhook secrets)")
        if self.fault_injection:
            raise ValueError("INPAINT_FAULT_INJECTION is a test hook, refused in production")
        for name, on in (("WEBHOOK", self.webhook_allow_private), ("FETCH", self.fetch_allow_private)):
            if on:  # outbound calls to private addresses: the SSRF a deployment must never allow
                raise ValueError(f"INPAINT_{name}_ALLOW_PRIVATE is for tests, refused in production")
        if (
            # by name or by id (`inpaint/tiny-random`)
            {m.removeprefix("inpaint/") for m in (self.model, *self.model_list())} & set(TOY_MODELS)
            or (self.safety != "none" and self.safety_checker == "tiny-random")
        ):
            raise ValueError(f"toy models ({', '.join(TOY_MODELS)}, the tiny safety checker) are refused in production")
        secrets = [
            ("INPAINT_S3_SECRET_ACCESS_KEY", self.s3_secret_access_key),
            ("INPAINT_WEBHOOK_SECRET", self.webhook_secret),
            ("INPAINT_SECRETS_KEY", self.secrets_key),
            ("INPAINT_METRICS_TOKEN", self.metrics_token),
            ("INPAINT_REDIS_URL", self.redis_url),
            *(("INPAINT_API_KEYS", k) for k in self.api_key_map()),
            # compose hands the whole .env to every service: its other secrets are checked here too
            *((name, os.environ.get(name, "")) for name in ("REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD")),
        ]
        for name, value in secrets:
            if PLACEHOLDER in value.upper():
                raise ValueError(
                    f"{name} still holds a placeholder ({PLACEHOLDER}…) from .env.example, refused in production"
                )

    def model_list(self) -> list[str]:
        """INPAINT_MODELS as a list (empty: none named)."""
        return [m.strip() for m in self.models.split(",") if m.strip()]

    def accepted_licenses(self) -> set[str]:  # the models (names or ids) whose licence the operator accepted
        return {m.strip() for m in self.accept_licenses.split(",") if m.strip()}

    @property
    def faults_enabled(self) -> bool:
        """Fault injection is honoured only in the test environment."""
        return self.fault_injection and self.environment == "test"

    @property
    def visibility_timeout_s(self) -> int:
        """Broker redelivery delay: above the longest job, so a live job is not handed out twice."""
        return self.broker_visibility_timeout_s or self.job_time_limit_s + 300

    def compiled_sizes(self) -> list[tuple[int, int]]:
        """`512x512,768x768` as [(512, 512), (768, 768)] (width, height; multiples of 8)."""
        out = []
        for item in filter(None, (p.strip() for p in self.compile_sizes.split(","))):
            w, sep, h = item.lower().partition("x")
            if not sep or not w.isdigit() or not h.isdigit() or int(w) % 8 or int(h) % 8:
                raise ValueError(f"INPAINT_COMPILE_SIZES entry {item!r} is not WIDTHxHEIGHT in multiples of 8")
            out.append((int(w), int(h)))
        return out

    def outbound_port_list(self) -> list[int]:
        """`443,8443` as [443, 8443]; refused at start when not ports."""
        items = [p.strip() for p in self.outbound_ports.split(",") if p.strip()]
        if not all(p.isdigit() and 0 < int(p) < 65536 for p in items):
            raise ValueError(f"INPAINT_OUTBOUND_PORTS: {self.outbound_ports!r} is not comma-separated ports")
        return [int(p) for p in items]

    def api_key_map(self) -> dict[str, str]:
        """`tenant:key,tenant:key` as {key: tenant}."""
        out: dict[str, str] = {}
        for item in filter(None, (p.strip() for p in self.api_keys.split(","))):
            tenant, sep, key = item.partition(":")
            if not sep or not tenant or not key:
                raise ValueError(f"INPAINT_API_KEYS entry {item[:12]!r}… is not tenant:key")
            out[key] = tenant
        return out

    def weight_of(self, tenant: str) -> float:
        for item in filter(None, (p.strip() for p in self.tenant_weights.split(","))):
            name, sep, value = item.partition(":")
            if sep and name == tenant:
                return float(value)
        return 1.0

    def retry_schedule(self) -> list[float]:
        return [float(x) for x in self.webhook_retry_schedule_s.split(",") if x.strip()]

    def resolved_webhook_secret(self) -> str:
        """The open mode's signing secret: the configured one, or one generated once into the data dir."""
        return self.webhook_secret or self._generated(
            "webhook_secret", lambda: "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        )

    def resolved_secrets_key(self) -> str:
        """The key(s) that encrypt secrets at rest: the configured ones, or one generated once into the
        data dir (never in production, which refuses to start without INPAINT_SECRETS_KEY)."""
        return self.secrets_key or self._generated(
            "secrets_key", lambda: base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
        )

    def _generated(self, name: str, make: Callable[[], str]) -> str:
        """A value made once and kept in the data dir (0600), shared by every process of the stack.
        Written whole to a temporary file, then linked into place: a racing process sees all or nothing."""
        path = self.data_dir / name
        if path.exists():
            return path.read_text().strip()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}-", dir=path.parent)  # 0600
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(make())
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process of the stack won the race: its value stands
        finally:
            os.unlink(tmp)
        return path.read_text().strip()


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings; tests build their own `Settings` instead."""
    return Settings()
