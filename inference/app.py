"""The inference app: Starlette routes wrapped by the identity and audit layers (pure ASGI).

Start-up order: the publisher starts first (so even requests answered 503 while the model loads
are audited), then the model loads on a background thread (building the offline default model
when no TOKENAUDIT_MODEL is configured and it is missing) and, with XLA on, compiles every
shape bucket; only then does /readyz answer 200. Shutdown (uvicorn finishes in-flight requests
first): the batcher drains, then the producer flushes within ``shutdown_flush_seconds`` and
spools whatever is left. With ``TOKENAUDIT_METRICS_PORT`` set, /metrics is also served on
127.0.0.1 at that port (a listener of its own, for a local scraper).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from starlette.applications import Starlette
from starlette.routing import Route

from tokenaudit.errors import RegistryError, SpoolLocked
from tokenaudit.inference import embeddings_route, routes
from tokenaudit.inference.audit import AuditMiddleware, PromptDigester
from tokenaudit.inference.batcher import MicroBatcher, QueueFull
from tokenaudit.inference.budgets import BudgetEnforcer, model_pricer
from tokenaudit.inference.identity import IdentityMiddleware, parse_networks
from tokenaudit.inference.metrics import AppMetrics, start_metrics_listener
from tokenaudit.inference.publisher import EventPublisher
from tokenaudit.inference.rate_limits import RateLimiter, RateLimitMiddleware
from tokenaudit.inference.runner import Encoded, ModelRunner
from tokenaudit.infra import schema_registry
from tokenaudit.infra.budget_view import BudgetView
from tokenaudit.infra.kafka_clients import kafka_config
from tokenaudit.infra.keys import KeyRegistry
from tokenaudit.infra.prices import PriceTable
from tokenaudit.schemas.records import TokenUsageEvent
from tokenaudit.settings import Settings

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class AppState:
    """Everything the handlers share, owned by the app's lifespan."""

    def __init__(self, settings: Settings, runner: ModelRunner):
        self.settings = settings
        self.runner = runner
        self.model_name = runner.model_name
        self.digest = PromptDigester.from_settings(settings.prompt_digest_secret, settings.data_dir)
        self.publisher: EventPublisher | None = None
        self.batcher: MicroBatcher | None = None
        # hard cost budgets price this model with the price file, as the worker prices the stream
        pricer = model_pricer(PriceTable.load(settings.price_table), self.model_name) if settings.price_table else None
        self.budgets = BudgetEnforcer(BudgetView(settings), settings.budget_period_seconds, pricer)
        self.metrics = AppMetrics(lambda: self.publisher, self._extra_metrics)
        # tokenizing happens here, on the request side: never on the event loop (a 1 MB prompt
        # takes ~1.5 s) and never on the model thread (it would stall everyone's batch)
        self.tokenizer_pool = ThreadPoolExecutor(settings.tokenizer_threads, thread_name_prefix="tokenize")
        self._tokenizing = 0  # requests in (or waiting for) the tokenizer pool; event loop only
        self.ready = False
        self.load_error: str | None = None

    def not_ready_reason(self) -> str:
        return f"model failed to load: {self.load_error}" if self.load_error else "model is loading"

    def _extra_metrics(self) -> dict:
        return {
            "model_ready": (1 if self.ready else 0, "1 once the model is loaded (and compiled)."),
            "batcher_queue_depth": (self.batcher.depth if self.batcher else 0, "Requests waiting for a batch."),
            "batches": (self.batcher.batches if self.batcher else 0, "Generate calls made."),
            "batch_rows_retried": (
                self.batcher.retried_rows if self.batcher else 0,
                "Rows run again alone after their batch failed.",
            ),
        }

    async def tokenize(self, prompt: str) -> Encoded:
        """The prompt's ids, from the tokenizer pool. Requests waiting here count against
        ``max_queue`` too: the pool's own queue is unbounded, and a flood of long prompts must
        meet the same bound as a flood of short ones."""
        return await self._in_tokenizer_pool(self.runner.tokenize, prompt)

    async def tokenize_many(self, texts: list[str]) -> list[Encoded]:
        """The ids of several texts (one embeddings request): one job, one slot of the same bound."""
        return await self._in_tokenizer_pool(self.runner.encode, texts)

    async def _in_tokenizer_pool(self, fn, arg):
        if self._tokenizing >= self.settings.max_queue:
            raise QueueFull(f"{self._tokenizing} requests are waiting to be tokenized")
        self._tokenizing += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.tokenizer_pool, fn, arg)
        finally:
            self._tokenizing -= 1

    def publish(self, event: TokenUsageEvent) -> None:
        budgets = self.budgets  # a hard-budget request settles here, and its event reports its offset
        hook = budgets.settle(event) if budgets.inflight else None
        if self.publisher is not None:
            self.publisher.publish(event, hook)
        self.metrics.observe(event)

    def load_model(self) -> None:
        """Load (building the default first if needed), warm up, start batching; on a background thread."""
        try:
            if not self.settings.model:
                from tokenaudit.inference.model_init import build_default_model

                if build_default_model(self.settings.effective_model):
                    log.info("built the default model at %s", self.settings.effective_model)
            self.runner.load()
            took = self.runner.warmup()
            log.info("model %s ready on %s (warm-up %.1fs)", self.model_name, self.runner.device, took)
            s = self.settings
            self.batcher = MicroBatcher(
                self.runner,
                s.batch_max_size,
                s.batch_max_wait_ms,
                max_queue=s.max_queue,
                queue_timeout=s.queue_timeout_seconds,
            )
            self.batcher.start()
            self.ready = True
        except Exception as exc:
            self.load_error = str(exc)
            log.error("model %s failed to load: %s", self.settings.effective_model, exc)


def runner_from_settings(s: Settings) -> ModelRunner:
    return ModelRunner(
        s.effective_model,
        max_input_tokens=s.max_input_tokens,
        xla=s.xla,
        batch_buckets=s.xla_batch_buckets,
        length_buckets=s.xla_length_buckets,
        new_token_buckets=s.xla_new_token_buckets,
        max_batch=s.batch_max_size,
        max_new_tokens_limit=s.max_new_tokens_limit,
    )


def publisher_from_settings(s: Settings) -> EventPublisher:
    # registry ids bound here, before the model loads: /readyz is not ready before, and the
    # request path never calls the registry
    confluent = schema_registry.prepare(s)
    return EventPublisher(
        s.kafka_bootstrap,
        s.topic_usage,
        s.effective_spool_dir,
        spool_max_bytes=s.spool_max_bytes,
        queue_max=s.producer_queue_max,
        message_timeout_ms=s.producer_message_timeout_ms,
        linger_ms=s.producer_linger_ms,
        compression=s.producer_compression,
        retry_seconds=s.spool_retry_seconds,
        partitions=s.kafka_partitions,
        unauthenticated_share=s.spool_unauthenticated_share,
        client_config=kafka_config(s),
        confluent=confluent,
        cloudevents_source=f"tokenaudit/{s.effective_instance}" if s.cloudevents_headers else None,
    )


def create_app(
    settings: Settings,
    *,
    audit: bool = True,
    runner: ModelRunner | None = None,
    load_in_background: bool = True,
) -> IdentityMiddleware | AuditMiddleware:
    """The ASGI app. ``audit=False`` exists only for the overhead benchmark: no events at all."""
    runner = runner or runner_from_settings(settings)
    state = AppState(settings, runner)
    registry = KeyRegistry.from_settings(settings)
    trusted = parse_networks(settings.trusted_proxies)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            state.publisher = publisher_from_settings(settings).start()
        except (SpoolLocked, RegistryError) as exc:
            log.error("cannot start: %s", exc)
            raise
        state.budgets.view.start()  # hard budgets: followed from the budgets and spend topics
        listener = start_metrics_listener(state.metrics, settings.metrics_port) if settings.metrics_port else None
        loader = threading.Thread(target=state.load_model, name="model-loader", daemon=True)
        loader.start()
        if not load_in_background:
            loader.join()
        try:
            yield
        finally:
            if listener is not None:
                listener[0].shutdown()
                listener[0].server_close()
            if state.batcher is not None:
                state.batcher.stop()
            state.tokenizer_pool.shutdown(wait=False)
            state.budgets.view.close()
            state.publisher.close(settings.shutdown_flush_seconds)
            log.info("publisher closed: %s", state.publisher.stats)

    star = Starlette(
        routes=[
            Route("/v1/generate", routes.generate, methods=["POST"]),
            Route("/v1/completions", routes.completions, methods=["POST"]),
            Route("/v1/chat/completions", routes.chat_completions, methods=["POST"]),
            Route("/v1/embeddings", embeddings_route.embeddings, methods=["POST"]),
            Route("/v1/models", routes.models, methods=["GET"]),
            Route("/healthz", routes.healthz, methods=["GET"]),
            Route("/readyz", routes.readyz, methods=["GET"]),
            Route("/metrics", routes.metrics, methods=["GET"]),
        ],
        exception_handlers={404: routes.not_found, 405: routes.method_not_allowed, Exception: routes.server_error},
        lifespan=lifespan,
    )
    star.state.tokenaudit = state
    metered = RateLimitMiddleware(star, RateLimiter())  # per-key rpm/tpm, inside the identity layer
    app: IdentityMiddleware | AuditMiddleware = IdentityMiddleware(metered, registry, trusted, OPEN_PATHS)
    exclude = frozenset(p.strip() for p in settings.audit_exclude_paths.split(",") if p.strip())
    state.budgets.unaudited = exclude if audit else None  # no event, no settle: nothing to reserve
    if audit:
        app = AuditMiddleware(app, state.publish, runner.model_name, exclude, settings.effective_instance)
    app.state = state  # for tests and the server: reach the state through the outer app
    return app
