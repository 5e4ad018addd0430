"""Talking to a model: any OpenAI-compatible Chat Completions server, through the official client.

- JSON answers held to a schema: structured outputs (``json_schema``) where the server has
  them, else JSON mode (``json_object``) with the schema in the prompt, else the prompt alone
  (``MP4T_LLM_JSON_MODE``; ``auto`` steps down once when a server refuses a mode). Every answer
  is parsed and validated; an invalid one is repaired once (the error goes back to the model),
  then it fails clearly (``LLMOutputError``).
- Retries with backoff on 408/409/429/5xx, timeouts and connection errors are the client's own
  (``max_retries``; it honours Retry-After). What still fails is ``transient`` for the runner.
- At most ``MP4T_LLM_MAX_CONCURRENCY`` requests in flight per process.
- A deadline (``deadline``, the item's time limit) bounds each request's timeout; near it the
  client retries no more (a request never runs far past the deadline).
- Tokens are counted, not guessed: the server's own tokenizer where it has an endpoint for it
  (llama.cpp, llama-cpp-python, vLLM), else the UTF-8 byte count, which bounds any byte-level
  BPE tokenizer's count from above (chunks come out smaller, never truncated).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Iterator

import openai
import structlog

from mp4totext.config import LLMSettings, Settings, section
from mp4totext.enhancements import TokenUsage, strict_schema
from mp4totext.errors import WorkError
from observability import metrics, tracing

log = structlog.get_logger(__name__)

RETRY_WAIT_S = 120.0  # the longest wait between tries the openai client takes (a Retry-After up to 2 min)
MESSAGE_OVERHEAD = 8  # tokens a chat template adds around each message (generous for common templates)
MODES = ("json_schema", "json_object", "none")
# OpenAI's frequency_penalty (llama.cpp's server takes it too, over its last 64 tokens) on the retry
# of an answer cut off at max_tokens; a server that refuses it is asked without it from then on.
LOOP_PENALTY = 0.5


class LLMError(WorkError):
    """The AI layer cannot do this; retrying will not help (the message says why)."""

    reason, retryable = "LLM_REFUSED", False


class LLMOutputError(LLMError):
    """The model's answer did not match the schema, even after one repair."""

    reason = "LLM_OUTPUT_INVALID"


class LLMConfigError(LLMError):
    """The configuration cannot work for this item (a context window too small for the prompt)."""

    reason = "CONTEXT_TOO_SMALL"


class LLMDeadline(Exception):
    """The item's time limit came before this request could be sent (the runner ends the item)."""


class LLMUnreachable(Exception):
    """The LLM server did not answer (transient: the item is tried again later)."""


@dataclasses.dataclass(frozen=True)
class Answer:
    value: Any
    usage: TokenUsage
    requests: int


_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("llm_deadline", default=None)


@contextlib.contextmanager
def deadline(at_monotonic: float) -> Iterator[None]:
    """Requests sent inside (this thread) end by ``at_monotonic`` (time.monotonic())."""
    token = _DEADLINE.set(at_monotonic)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def retry_after_s(exc: BaseException) -> float | None:
    """The wait a server asked for with its refusal (Retry-After / retry-after-ms), if any."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    try:
        if headers.get("retry-after-ms"):
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        if headers.get("retry-after"):
            return max(0.0, float(headers["retry-after"]))
    except ValueError:  # an HTTP date: rare for APIs; the backoff applies
        return None
    return None


def _quota_gone(exc: BaseException) -> bool:
    """OpenAI's 429 for an account without credit: waiting does not help."""
    return isinstance(exc, openai.APIStatusError) and exc.status_code == 429 and \
        getattr(exc, "code", None) == "insufficient_quota"


def transient(exc: BaseException) -> bool:
    """A failure that may pass (server down, overloaded, slow): the runner retries the item later."""
    if _quota_gone(exc):
        return False
    if isinstance(exc, (LLMUnreachable, openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError,
                        openai.InternalServerError)):
        return True
    return isinstance(exc, openai.APIStatusError) and exc.status_code in (408, 409, 429) or (
        isinstance(exc, openai.APIStatusError) and exc.status_code >= 500)


def _outcome(exc: BaseException) -> str:
    if _quota_gone(exc):
        return "quota_exhausted"
    if isinstance(exc, openai.RateLimitError):
        return "rate_limited"
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection"
    if isinstance(exc, openai.APIStatusError) and exc.status_code >= 500:
        return "server_error"
    return "refused"


@functools.lru_cache(maxsize=8)
def _slots(n: int) -> threading.BoundedSemaphore:
    return threading.BoundedSemaphore(max(1, n))


class TokenCounter:
    """Counts tokens with the server's tokenizer endpoint, found once; else UTF-8 bytes (a bound)."""

    def __init__(self, base_url: str, model: str, how: str, timeout_s: float = 10.0) -> None:
        self.root = base_url.rstrip("/").removesuffix("/v1")
        self.model, self.how, self.timeout_s = model, how, timeout_s
        self.endpoint: Callable[[str], int] | None = None
        self.probed = how != "auto" or not base_url
        self.lock = threading.Lock()

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        req = urllib.request.Request(f"{self.root}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310 - the configured server
            return json.loads(resp.read())

    def _candidates(self) -> list[Callable[[str], int]]:
        def llama_cpp_python(text: str) -> int:  # llama-cpp-python's server
            return int(self._post("/extras/tokenize/count", {"input": text, "model": self.model})["count"])

        def llama_cpp(text: str) -> int:  # llama.cpp's llama-server
            return len(self._post("/tokenize", {"content": text})["tokens"])

        def vllm(text: str) -> int:
            return int(self._post("/tokenize", {"model": self.model, "prompt": text})["count"])

        return [llama_cpp_python, llama_cpp, vllm]

    def _probe(self) -> None:
        """Find the endpoint once. A server that does not answer at all is not a server without
        one: that raises (the item waits for the server), so counts never switch mid-item."""
        with self.lock:
            if self.probed:
                return
            unreachable = 0
            for fn in self._candidates():
                try:
                    if fn("probe, one two") > 0:
                        self.endpoint = fn
                        break
                except urllib.error.HTTPError as exc:
                    if exc.code >= 500:  # loading its model, overloaded: no answer yet
                        unreachable += 1
                        error = exc
                    continue  # 4xx: it answered, not this endpoint
                except OSError as exc:  # connection refused, timeout
                    unreachable += 1
                    error = exc
                except (KeyError, ValueError, TypeError):
                    continue
            if self.endpoint is None and unreachable == len(self._candidates()):
                raise LLMUnreachable(f"the LLM server at {self.root} did not answer: {error}")
            self.probed = True
            log.info("llm_tokenizer", endpoint=self.endpoint.__name__ if self.endpoint else "utf8_bytes")

    @property
    def exact(self) -> bool:
        self._probe()
        return self.endpoint is not None

    def __call__(self, text: str) -> int:
        self._probe()
        if self.endpoint is not None and text:
            try:
                return self.endpoint(text)
            except OSError as exc:  # counting the same way throughout keeps an item's chunks stable
                raise LLMUnreachable(f"the LLM server's tokenizer did not answer: {exc}") from exc
        return len(text.encode("utf-8"))


class LLM:
    """One configured model. ``on_request`` runs before each request is sent (accounting)."""

    def __init__(self, settings: LLMSettings | Settings) -> None:
        s: LLMSettings = section(settings, LLMSettings)  # its section: MP4T_LLM_*
        if not s.model:
            raise LLMError("no LLM is configured: set MP4T_LLM_MODEL (and MP4T_LLM_BASE_URL, MP4T_LLM_API_KEY)")
        self.s = s
        self.model = s.model
        answered = metrics.LLM_RESPONSES.labels  # every HTTP answer, the client's own retries included

        def count(resp: Any) -> None:  # the client's httpx Response
            answered(self.model, str(resp.status_code)).inc()

        self.client = openai.OpenAI(base_url=s.base_url or None, api_key=s.api_key or "not-needed",
                                    timeout=s.timeout_s, max_retries=s.max_retries,
                                    http_client=openai.DefaultHttpxClient(event_hooks={"response": [count]}))
        self.count = TokenCounter(s.base_url, s.model, s.tokenizer)
        self.mode = s.json_mode if s.json_mode in MODES else "json_schema"
        self.auto = s.json_mode == "auto"
        self.confirmed = False  # the server took a request in this mode
        self.mode_lock = threading.Lock()
        self.slots = _slots(s.max_concurrency)
        # OpenAI's reasoning models refuse max_tokens (they want max_completion_tokens) and any
        # temperature but their own: learnt from the first refusal, once per process.
        self.token_param = "max_tokens"
        self.send_temperature = True
        self.send_penalty = True

    def _adapt(self, exc: openai.APIStatusError) -> bool:
        """Whether a 400 names a parameter this model does not take that we can do without."""
        text = str(exc)
        if exc.status_code != 400:
            return False
        with self.mode_lock:
            if self.token_param == "max_tokens" and "max_tokens" in text and "max_completion_tokens" in text:
                self.token_param = "max_completion_tokens"
            elif self.send_temperature and "temperature" in text and (
                    "nsupported" in text or "does not support" in text):
                self.send_temperature = False
            elif self.send_penalty and "frequency_penalty" in text:
                self.send_penalty = False
            else:
                return False
        log.warning("llm_parameter_refused", adapted_to=f"{self.token_param}, temperature "
                    f"{'sent' if self.send_temperature else 'left to the model'}, frequency_penalty "
                    f"{'sent on retries' if self.send_penalty else 'not sent'}", error=text[:300])
        return True

    def cost(self, prompt: int, completion: int) -> float:
        return round(prompt / 1000 * self.s.price_prompt_per_1k
                     + completion / 1000 * self.s.price_completion_per_1k, 8)

    def prompt_tokens(self, *texts: str) -> int:
        return sum(self.count(t) + MESSAGE_OVERHEAD for t in texts)

    @property
    def schema_in_prompt(self) -> bool:
        """Whether a request's schema may travel in its system prompt (JSON mode, prompt only; and
        while ``auto`` has not yet found what the server takes): its tokens count then."""
        return self.mode != "json_schema" or (self.auto and not self.confirmed)

    def schema_tokens(self, schema: dict[str, Any]) -> int:
        return self.count(json.dumps(schema)) + 24 if self.schema_in_prompt else 0

    def _format(self, name: str, schema: dict[str, Any]) -> dict[str, Any] | None:
        # Length bounds stay out of what the server gets (strict mode refuses them, and llama.cpp's
        # grammar for a long maxLength does not parse); the answer is validated against them.
        if self.mode == "json_schema":
            return {"type": "json_schema", "json_schema": {"name": name, "schema": strict_schema(schema),
                                                           "strict": True}}
        if self.mode == "json_object":  # llama.cpp servers turn the schema into a grammar; others ignore it
            return {"type": "json_object", "schema": strict_schema(schema)}
        return None

    def _step_down(self, refused: str, exc: Exception) -> None:
        with self.mode_lock:
            if self.mode == refused:  # another thread may have stepped down already
                log.warning("llm_json_mode_refused", mode=refused, error=str(exc)[:300])
                self.mode = MODES[MODES.index(refused) + 1]

    def _messages(self, system: str, user: list[dict[str, str]], schema: dict[str, Any]) -> list[dict[str, str]]:
        if self.mode != "json_schema":
            system = f"{system}\n\nAnswer with one JSON object that follows this JSON schema:\n{json.dumps(schema)}"
        return [{"role": "system", "content": system}, *user]

    def _client(self, probing: bool) -> openai.OpenAI:
        """The client for one request: the item's deadline bounds its timeout, and the client
        retries only as often as fits before it, each try and each wait (Retry-After, at most
        RETRY_WAIT_S) taken whole; the runner decides what comes after."""
        end = _DEADLINE.get()
        if end is None:
            return self.client.with_options(max_retries=0) if probing else self.client
        left = end - time.monotonic()
        if left <= 0:
            raise LLMDeadline("the item's time limit was reached")
        timeout = min(self.s.timeout_s, left)
        fits = int((left - timeout) // (timeout + RETRY_WAIT_S))
        retries = 0 if probing else max(0, min(self.s.max_retries, fits))
        return self.client.with_options(timeout=timeout, max_retries=retries)

    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        """One of MP4T_LLM_MAX_CONCURRENCY request slots, waited for no longer than the deadline."""
        end = _DEADLINE.get()
        if not self.slots.acquire(timeout=None if end is None else max(0.0, end - time.monotonic())):
            raise LLMDeadline("the item's time limit came while it waited for a request slot "
                              "(MP4T_LLM_MAX_CONCURRENCY)")
        try:
            yield
        finally:
            self.slots.release()

    def _send(self, system: str, user: list[dict[str, str]], name: str, schema: dict[str, Any],
              max_tokens: int, temperature: float, penalty: float = 0.0) -> Any:
        while True:
            mode = self.mode
            messages = self._messages(system, user, schema)
            fmt = self._format(name, schema)
            extra = {"response_format": fmt} if fmt else {}
            probing = self.auto and not self.confirmed and mode != "none"
            # While auto mode is finding out what the server takes, a refusal is not retried (some
            # servers answer an unknown response_format with a 500).
            started = time.monotonic()
            try:
                with self._slot(), tracing.stage_span("llm chat completion", **{
                        "gen_ai.system": "openai", "gen_ai.request.model": self.model,
                        "gen_ai.request.max_tokens": max_tokens, "mp4t.llm.json_mode": mode}) as span:
                    client = self._client(probing)  # its timeout from what is left after the wait for a slot
                    started = time.monotonic()  # latency of the request, not of the wait for a slot
                    params: dict[str, Any] = {self.token_param: max_tokens}
                    if self.send_temperature:
                        params["temperature"] = temperature
                    if penalty and self.send_penalty:
                        params["frequency_penalty"] = penalty
                    resp = client.chat.completions.create(model=self.model, messages=messages, **params, **extra)
                    if resp.usage:
                        span.set_attributes({"gen_ai.usage.input_tokens": resp.usage.prompt_tokens,
                                             "gen_ai.usage.output_tokens": resp.usage.completion_tokens})
                self.confirmed = True
            except openai.APIStatusError as exc:
                if self._adapt(exc):
                    continue
                if probing and ("response_format" in str(exc) or "json" in str(exc).lower()):
                    self._step_down(mode, exc)
                    continue
                metrics.LLM_REQUESTS.labels(self.model, _outcome(exc)).inc()
                if _quota_gone(exc):
                    raise LLMError(f"the LLM provider says the account has no quota left (429 insufficient_quota): "
                                   f"add credit or set another MP4T_LLM_API_KEY; {exc}") from exc
                if not transient(exc):
                    raise LLMError(f"the LLM server refused the request ({exc.status_code}): {exc}") from exc
                raise
            except openai.OpenAIError as exc:
                metrics.LLM_REQUESTS.labels(self.model, _outcome(exc)).inc()
                if isinstance(exc, openai.APIStatusError) and not transient(exc):
                    raise LLMError(f"the LLM server refused the request ({exc.status_code}): {exc}") from exc
                raise
            finally:
                metrics.LLM_LATENCY.labels(self.model).observe(time.monotonic() - started)
            return resp

    def ask_json(self, system: str, user: str, name: str, schema: dict[str, Any],
                 validate: Callable[[Any], Any], max_tokens: int,
                 on_request: Callable[[], None] = lambda: None, shorten: bool = True,
                 on_usage: Callable[[TokenUsage], None] = lambda _u: None) -> Answer:
        """The model's answer to ``user``, parsed and checked by ``validate`` (which raises
        ValueError with a message the model can act on). One repair, then LLMOutputError.

        An answer cut off at ``max_tokens`` is asked again afresh, for a shorter one and with a
        frequency penalty against loops, when ``shorten``; else it fails at once (a batch of
        segments is split instead: every segment must keep its whole text)."""
        turns = [{"role": "user", "content": user}]
        usage, error, temperature, penalty = TokenUsage(), "", self.s.temperature, 0.0
        for attempt in (1, 2):
            on_request()
            resp = self._send(system, turns, name, schema, max_tokens, temperature, penalty)
            p = resp.usage.prompt_tokens if resp.usage else 0
            c = resp.usage.completion_tokens if resp.usage else 0
            spent = TokenUsage(prompt_tokens=p, completion_tokens=c, cost=self.cost(p, c))
            usage = usage + spent
            on_usage(spent)  # paid for, whatever the answer is worth
            metrics.LLM_TOKENS.labels(self.model, "prompt").inc(p)
            metrics.LLM_TOKENS.labels(self.model, "completion").inc(c)
            choice = resp.choices[0]
            text = choice.message.content or ""
            try:
                if choice.finish_reason == "length":
                    raise ValueError(f"the answer was cut off after {c} tokens (max_tokens={max_tokens})")
                # strict=False: raw newlines inside strings (some servers' grammars let them through)
                value = validate(json.loads(text, strict=False))
            except (ValueError, TypeError) as exc:  # json.JSONDecodeError and pydantic's errors are ValueErrors
                error = str(exc)[:800]
                metrics.LLM_REQUESTS.labels(self.model, "invalid_output").inc()
                log.warning("llm_invalid_output", attempt=attempt, error=error, answer=text[:200])
                if choice.finish_reason == "length":
                    if not shorten:
                        raise LLMOutputError(f"the model's answer was cut off: {error}") from None
                    turns = [{"role": "user", "content": f"{user}\n\nKeep the answer short: every text value one "
                                                         "or two sentences, every list a few items."}]
                    # A cut-off answer is most often a loop (small models repeat a list item until
                    # the limit): the retry penalises tokens by how often they already came, at the
                    # configured temperature (SmolLM2 at 0.7 wrote broken strings in 3 of 4 retries).
                    penalty = LOOP_PENALTY
                else:
                    turns = [turns[0], {"role": "assistant", "content": text[:4000]},
                             {"role": "user", "content": f"That answer is not valid: {error}. Answer again with "
                                                         "only the corrected JSON object, nothing else."}]
                    # the bad answer and the error now take room in the context window
                    max_tokens = max(16, max_tokens - self.count(turns[1]["content"] + turns[2]["content"]) - 64)
                continue
            metrics.LLM_REQUESTS.labels(self.model, "ok").inc()
            return Answer(value, usage, attempt)
        raise LLMOutputError(f"the model's answer did not match the expected JSON after one repair: {error}")
