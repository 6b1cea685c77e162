"""Guard benchmarks and the library comparison behind bench/GUARD.md.

Run from the repository root:

    python -m bench.guard_bench            # our guard only
    python -m bench.guard_bench --libs     # + detect-secrets and presidio-analyzer
                                           #   (pip install detect-secrets presidio-analyzer;
                                           #    evaluation only, never runtime dependencies)

Times are `time.perf_counter_ns` over many runs; both min (closest to an idle machine)
and median are printed, with the load average, because the 2-core machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

import orjson

from extproc.policies.guard import Guard, GuardConfig
from extproc.policies.guard.injection import InjectionScreener, score_text
from extproc.policies.guard.redact import collect_texts
from tests.data.claude_code_request import build_request
from tests.data.guard_samples import NEGATIVES, POSITIVES

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Timing:
    min_us: float
    median_us: float

    def __str__(self) -> str:
        return f"{self.min_us:,.0f} / {self.median_us:,.0f}"


def timeit(
    fn: Callable[[], object], runs: int, setup: Callable[[], object] | None = None
) -> Timing:
    samples = []
    for _ in range(runs):
        if setup is not None:
            setup()
        t0 = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t0)
    return Timing(min(samples) / 1e3, statistics.median(samples) / 1e3)


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, load avg {load}"


# ---------------------------------------------------------------- our guard


def bench_detectors(runs: int) -> list[tuple[str, Timing]]:
    policy = Guard().profile()
    det = policy.redaction.detector
    small, big = build_request(), build_request(1 << 20)
    small_raw, big_raw = orjson.dumps(small), orjson.dumps(big)

    def cold(raw: bytes) -> Callable[[], object]:
        return lambda: policy.redact_request(orjson.loads(raw), "anthropic")

    clear = det.cache.clear
    rows = [
        ("117 KB Claude Code request, cold (parse + scan)", timeit(cold(small_raw), runs, clear)),
        ("117 KB, parse only (orjson.loads)", timeit(lambda: orjson.loads(small_raw), runs)),
        ("117 KB, next turn: same history, new objects", timeit(cold(small_raw), runs)),
        ("1 MB body, cold (parse + scan)", timeit(cold(big_raw), max(5, runs // 4), clear)),
        ("1 MB, next turn: same history, new objects", timeit(cold(big_raw), max(5, runs // 4))),
        ("1 MB, parse only", timeit(lambda: orjson.loads(big_raw), max(5, runs // 4))),
    ]
    # The request path's call: redaction and injection scoring over one walk, with every
    # cache of the profile (walked units, findings, injection scores) cold or warm.

    def inspect(raw: bytes) -> Callable[[], object]:
        return lambda: policy.inspect(orjson.loads(raw), "anthropic")

    forget = policy.forget
    rows += [
        ("117 KB inspect (redaction + injection), cold", timeit(inspect(small_raw), runs, forget)),
        ("117 KB inspect, same request again", timeit(inspect(small_raw), runs)),
        ("1 MB inspect, cold", timeit(inspect(big_raw), max(5, runs // 4), forget)),
        ("1 MB inspect, same request again", timeit(inspect(big_raw), max(5, runs // 4))),
    ]
    assert policy.redact_request(small, "anthropic").body is None
    return rows


def bench_injection(runs: int) -> list[tuple[str, Timing]]:
    body = build_request()
    every = InjectionScreener(action="block", scope="all")
    last = InjectionScreener(action="block")
    size = sum(len(t) for _, t in every.items(body, "anthropic"))
    # Cold: the screener's scores of texts already seen (`scores`) cleared before each run.
    return [
        (
            f"injection screen, scope=all ({size / 1024:.0f} KB untrusted text)",
            timeit(lambda: every.screen(body, "anthropic"), runs, every.scores.clear),
        ),
        (
            "injection screen, scope=last_turn (default)",
            timeit(lambda: last.screen(body, "anthropic"), runs, last.scores.clear),
        ),
        (
            "injection screen, last_turn, same texts again",
            timeit(lambda: last.screen(body, "anthropic"), runs),
        ),
    ]


def _answer_text() -> str:
    texts = collect_texts(build_request(), "anthropic")
    return "\n".join(texts)[:20_000]


def _chunks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def bench_stream(runs: int) -> list[tuple[str, Timing]]:
    guard = Guard(
        GuardConfig.model_validate(
            {
                "profiles": {
                    "default": {
                        "output": {
                            "deny": [
                                {"id": "no_rm", "phrase": "rm -rf /"},
                                {"id": "codename", "phrase": "Project Falcon"},
                            ]
                        }
                    }
                }
            }
        )
    )
    profile = guard.profile()
    text = _answer_text()
    chunks = _chunks(text, 40)

    def screen_stream() -> None:
        s = profile.output_stream()
        for c in chunks:
            s.feed(c)
        s.flush()

    masks = {f"[EMAIL_{i}]": f"user{i}@acme-corp.io" for i in range(1, 6)}

    def unmask_stream() -> None:
        s = profile.unmasker(masks).stream()
        for c in chunks:
            s.feed(c)
        s.flush()

    per = len(chunks)
    total = timeit(screen_stream, runs)
    unmask = timeit(unmask_stream, runs)
    whole = timeit(lambda: profile.output.screen_text(text), runs)
    label = f"output screener, {len(text) // 1000} KB answer in {per} x 40-char deltas (total)"
    return [
        (label, total),
        ("  per delta", Timing(total.min_us / per, total.median_us / per)),
        ("  same text, whole-body screen_text", whole),
        (
            "unmasker stream (5 placeholders), per delta",
            Timing(unmask.min_us / per, unmask.median_us / per),
        ),
    ]


# ---------------------------------------------------------------- injection set


def eval_injection() -> list[tuple[float, int, int, int, int]]:
    rows = [
        json.loads(x) for x in (ROOT / "tests/data/injection_set.jsonl").read_text().splitlines()
    ]
    scored = [(score_text(r["text"]).score, r["label"] == "injection") for r in rows]
    out = []
    for th in (0.5, 0.6, 0.7, 0.8, 0.9):
        tp = sum(s >= th and y for s, y in scored)
        fp = sum(s >= th and not y for s, y in scored)
        fn = sum(s < th and y for s, y in scored)
        tn = sum(s < th and not y for s, y in scored)
        out.append((th, tp, fp, fn, tn))
    return out


# ---------------------------------------------------------------- libraries


Span = tuple[int, int]
SECRET_RULES = {r for r, _, _ in POSITIVES} - {
    "email",
    "phone",
    "credit_card",
    "iban",
    "us_ssn",
    "ipv4",
    "ipv6",
}


def _overlaps(spans: Iterable[Span], start: int, end: int) -> bool:
    return any(a < end and start < b for a, b in spans)


def _accuracy(find: Callable[[str], list[Span]], positives: Sequence[tuple[str, str, str]]) -> str:
    tp = sum(
        _overlaps(find(text), text.index(v), text.index(v) + len(v)) for _, text, v in positives
    )
    fp = sum(bool(find(text)) for text in NEGATIVES)
    return f"{tp}/{len(positives)} found, {fp}/{len(NEGATIVES)} negatives flagged"


def _ours() -> Callable[[str], list[Span]]:
    det = Guard().profile().redaction.detector
    return lambda text: [(f.start, f.end) for f in det.scan(text)]


def _detect_secrets() -> Callable[[str], list[Span]]:
    settings = import_module("detect_secrets.settings")
    collection_cls = import_module("detect_secrets").SecretsCollection
    tmp = Path(tempfile.mkdtemp())

    def find(text: str) -> list[Span]:
        path = tmp / "sample.txt"
        path.write_text(text)
        with settings.default_settings():
            collection = collection_cls()
            collection.scan_file(str(path))
        spans = []
        for _, secret in collection:
            value = secret.secret_value or ""
            i = text.find(value) if value else -1
            spans.append((i, i + len(value)) if i >= 0 else (0, len(text)))
        return spans

    return find


PRESIDIO_TYPES = {
    "EMAIL_ADDRESS",
    "PHONE_NUMBER",
    "CREDIT_CARD",
    "IBAN_CODE",
    "US_SSN",
    "IP_ADDRESS",
}


def _presidio() -> Callable[[str], list[Span]]:
    spacy = import_module("spacy")
    analyzer_mod = import_module("presidio_analyzer")
    nlp_mod = import_module("presidio_analyzer.nlp_engine")
    model_dir = tempfile.mkdtemp()
    spacy.blank("en").to_disk(model_dir)  # no NER model can be downloaded here
    engine = nlp_mod.SpacyNlpEngine(models=[{"lang_code": "en", "model_name": model_dir}])
    analyzer: Any = analyzer_mod.AnalyzerEngine(nlp_engine=engine, supported_languages=["en"])

    def find(text: str) -> list[Span]:
        results = analyzer.analyze(text, language="en", entities=sorted(PRESIDIO_TYPES))
        return [(r.start, r.end) for r in results if r.score >= 0.4]

    return find


def eval_libraries(runs: int) -> list[tuple[str, str, str, str]]:
    texts = collect_texts(build_request(), "anthropic")
    joined = "\n".join(texts)
    secret_pos = [p for p in POSITIVES if p[0] in SECRET_RULES]
    pii_pos = [p for p in POSITIVES if p[0] not in SECRET_RULES]
    rows = []
    libraries = (
        ("ours (extproc guard)", _ours),
        ("detect-secrets 1.5", _detect_secrets),
        ("presidio-analyzer (pattern recognizers, blank spaCy)", _presidio),
    )
    for name, factory in libraries:
        try:
            find = factory()
            find("warm up")
        except Exception as exc:
            rows.append((name, f"cannot run: {type(exc).__name__}: {str(exc)[:80]}", "", ""))
            continue
        fixture_hits = len(find(joined))
        speed = timeit(lambda f=find: f(joined), max(3, runs // 10))  # type: ignore[misc]
        accuracy = f"secrets {_accuracy(find, secret_pos)}; PII {_accuracy(find, pii_pos)}"
        clean = f"{fixture_hits} findings on the clean 117 KB fixture"
        rows.append((name, accuracy, clean, str(speed)))
    return rows


# ---------------------------------------------------------------- report


def _table(rows: Iterable[tuple[str, Timing]]) -> str:
    lines = ["| what | min / median (µs) |", "| --- | ---: |"]
    lines += [f"| {name} | {t} |" for name, t in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--libs", action="store_true", help="compare detect-secrets/presidio")
    args = parser.parse_args(argv)
    print(f"Machine: {machine()}\n")
    print("## Detectors (redact_request, default profile)\n")
    print(_table(bench_detectors(args.runs)))
    print("\n## Injection screening\n")
    print(_table(bench_injection(args.runs)))
    print("\n## Streaming output\n")
    print(_table(bench_stream(args.runs)))
    print("\n## Injection set (tests/data/injection_set.jsonl)\n")
    print("| threshold | TP | FP | FN | TN | precision | recall |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for th, tp, fp, fn, tn in eval_injection():
        prec = tp / (tp + fp) if tp + fp else 1.0
        print(f"| {th} | {tp} | {fp} | {fn} | {tn} | {prec:.3f} | {tp / (tp + fn):.3f} |")
    if args.libs:
        print("\n## Libraries on tests/data/guard_samples.py\n")
        print("| library | accuracy | false positives | 117 KB scan min / median (µs) |")
        print("| --- | --- | --- | --- |")
        for row in eval_libraries(args.runs):
            print("| " + " | ".join(row) + " |")
    print(f"\nMachine after run: {machine()}")


if __name__ == "__main__":
    main()
