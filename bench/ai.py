"""AI stage overhead: the stage against the same requests sent straight to the same server.

    .venv/bin/python bench/ai.py [--base-url URL --model NAME] [--kind cleanup] [--segments 60] [--rounds 3]

Starts llama-cpp-python with SmolLM2-135M (the test extra) unless --base-url is given. Each
round runs the stage (workers.stages.enhance: token counting, chunking, prompts, validation)
on a synthetic lecture transcript, recording every Chat Completions request it sends; then
sends exactly those requests with a bare ``openai`` client. Rounds alternate A B, B A so drift
and order hit both; a short unrelated request before each run resets llama.cpp's prompt-prefix
cache, so neither starts from its twin's prompt. Temperature 0: both get the same answers, so
the same number of tokens.

Prints per kind: stage s, direct s, the ratio (median of the pairs and best of each; target
<= 1.10), the stage's time over its own time inside requests (what the stage adds, free of the
server's noise: the same request varies 1.6-4 s from one call to the next on the shared
2-core machine), and completion tokens/s of each.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402

from mp4totext import samples  # noqa: E402
from mp4totext.config import Settings  # noqa: E402
from mp4totext.contracts import Segment, TranscriptResult  # noqa: E402
from mp4totext.enhancements import EnhancementKind, TokenUsage  # noqa: E402
from workers.stages import enhance  # noqa: E402
from workers.stages.llm import LLM  # noqa: E402


class Chunks:
    def __init__(self) -> None:
        self.stored: dict[str, Any] = {}
        self.usage = TokenUsage()

    def put(self, key: str, value: Any, usage: TokenUsage, done: int, total: int) -> None:
        self.stored[key] = value
        self.usage = self.usage + usage

    def progress(self, done: int, total: int) -> None:
        pass

    def request(self) -> None:
        pass

    def spent(self, usage: TokenUsage) -> None:
        pass


class Recording:
    """Wraps ``client.chat.completions.create``: keeps each request's arguments."""

    def __init__(self, llm: LLM) -> None:
        self.calls: list[dict[str, Any]] = []
        self.waited = 0.0  # seconds spent inside the requests
        create = llm.client.chat.completions.create

        def recorded(**kwargs: Any) -> Any:
            self.calls.append(kwargs)
            started = time.perf_counter()
            try:
                return create(**kwargs)
            finally:
                self.waited += time.perf_counter() - started

        llm.client.chat.completions.create = recorded  # type: ignore[method-assign]
        original = llm.client.with_options

        def with_options(**opts: Any) -> Any:
            client = original(**opts)
            client.chat.completions.create = recorded
            return client

        llm.client.with_options = with_options  # type: ignore[method-assign]


def transcript(n: int) -> TranscriptResult:
    sentences = samples.lecture_text(n * 4).split(". ")
    segs = [Segment(id=i, start=4.0 * i, end=4.0 * i + 3.5, text=sentences[i % len(sentences)].strip() + ".")
            for i in range(n)]
    return TranscriptResult(language="en", duration=4.0 * n, segments=segs, text=" ".join(s.text for s in segs))


def warmed_llm(s: Settings) -> tuple[LLM, Recording]:
    """The stage's client, its JSON mode found and tokenizer probed before anything is timed."""
    llm = LLM(s)
    llm.ask_json("Reply with JSON.", "Say ok.", "ok", {"type": "object", "properties": {"ok": {"type": "string"}},
                                                       "required": ["ok"], "additionalProperties": False},
                 lambda v: v, 16)
    return llm, Recording(llm)


def stage_round(llm: LLM, rec: Recording, s: Settings, kind: EnhancementKind,
                result: TranscriptResult) -> tuple[float, list[dict], int, float]:
    rec.calls, rec.waited = [], 0.0
    chunks = Chunks()
    started = time.perf_counter()
    enhance.run(kind, result, "en", llm, chunks, enhance.Budget(s.llm_context_tokens, s.llm_max_output_tokens))
    return time.perf_counter() - started, list(rec.calls), chunks.usage.completion_tokens, rec.waited


def reset_cache(s: Settings) -> None:
    """One short unrelated request: llama.cpp reuses the longest common prefix of the previous
    prompt, so each timed run starts from the same cache state (not from its twin's prompt)."""
    client = openai.OpenAI(base_url=s.llm_base_url, api_key="not-needed", timeout=s.llm_timeout_s)
    client.chat.completions.create(model=s.llm_model, max_tokens=1, temperature=0.0,
                                   messages=[{"role": "user", "content": f"reset {time.time()}"}])


def direct_round(s: Settings, calls: list[dict[str, Any]]) -> tuple[float, int]:
    client = openai.OpenAI(base_url=s.llm_base_url, api_key="not-needed", timeout=s.llm_timeout_s)
    tokens = 0
    started = time.perf_counter()
    for kwargs in calls:
        resp = client.chat.completions.create(**kwargs)
        tokens += resp.usage.completion_tokens if resp.usage else 0
    return time.perf_counter() - started, tokens


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--kind", action="append", choices=[k.value.lower() for k in EnhancementKind])
    p.add_argument("--segments", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args()
    server = None
    if not args.base_url:
        from tests.support.llm import LlamaServer
        server = LlamaServer(pathlib.Path(tempfile.mkdtemp(prefix="bench-llm-")))
        args.base_url, args.model = server.base_url, server.model
    s = Settings(llm_base_url=args.base_url, llm_model=args.model, llm_context_tokens=args.context,
                 llm_max_output_tokens=600, llm_temperature=0.0, llm_timeout_s=300)
    result = transcript(args.segments)
    figures = {}
    try:
        llm, rec = warmed_llm(s)
        for kind in [EnhancementKind(k.upper()) for k in (args.kind or ["cleanup", "summary"])]:
            stage_t, direct_t, ratios, own, stage_tok, direct_tok = [], [], [], [], 0, 0
            st, calls, tok, _w = stage_round(llm, rec, s, kind, result)  # warm-up, and the requests to replay
            for r in range(args.rounds):  # A B, B A, ...: order effects cancel
                if r % 2:
                    reset_cache(s)
                    dt, dtok = direct_round(s, calls)
                    reset_cache(s)
                    st, _calls, tok, waited = stage_round(llm, rec, s, kind, result)
                else:
                    reset_cache(s)
                    st, _calls, tok, waited = stage_round(llm, rec, s, kind, result)
                    reset_cache(s)
                    dt, dtok = direct_round(s, calls)
                stage_t.append(st)
                direct_t.append(dt)
                ratios.append(st / dt)
                own.append(st / waited)
                stage_tok, direct_tok = tok, dtok
            row = {"requests": len(calls), "stage_s": statistics.median(stage_t),
                   "direct_s": statistics.median(direct_t), "ratio": statistics.median(ratios),
                   "ratio_min": min(ratios), "ratio_max": max(ratios), "best_of_ratio": min(stage_t) / min(direct_t),
                   "stage_over_its_requests": statistics.median(own),
                   "stage_tokens_per_s": stage_tok / statistics.median(stage_t),
                   "direct_tokens_per_s": direct_tok / statistics.median(direct_t)}
            figures[kind.value] = row
            print(f"{kind.value:<14} {row['requests']:>3} requests  stage {row['stage_s']:6.2f} s  direct "
                  f"{row['direct_s']:6.2f} s  ratio median {row['ratio']:.3f} (min {row['ratio_min']:.3f} max "
                  f"{row['ratio_max']:.3f}), best of {args.rounds} {row['best_of_ratio']:.3f} (target <= 1.10); "
                  f"stage / its own time in requests {row['stage_over_its_requests']:.3f}; completion tokens/s "
                  f"stage {row['stage_tokens_per_s']:.1f} direct {row['direct_tokens_per_s']:.1f}", flush=True)
    finally:
        if server is not None:
            server.stop()
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
