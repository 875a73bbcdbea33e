"""Many visitors at once: concurrent Compare requests through gradio_client against a local app (issue #5).

    python bench/load.py [--concurrency 1,4,8] [--requests 4] [--max-new-tokens 64]

Starts `app.py` on a loopback port (never anything else: the URL is built here, not taken from the command line),
then for each concurrency level starts that many visitors, each with its own client and visitor id, sending
`--requests` Compare requests one after another. Stops by itself: a fixed number of requests, a deadline per level,
and the app is terminated at the end. Prints requests, errors and latency percentiles per level.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["人はどんなことをしてもらうと嬉しいですか?", "雨の日の週末におすすめの過ごし方は?", "睡眠の質を上げるには?",
           "部屋の掃除のコツは?", "プレゼンで緊張しないコツを教えてください。"]
SYSTEM = "あなたは日本語チャットbotです。ユーザの質問答えてください。"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(port: int, env: dict | None = None) -> subprocess.Popen:
    """`python app.py` on a loopback port (with `env` added to its environment); returns once the page is served."""
    env = {**os.environ, "PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_ANALYTICS_ENABLED": "False",
           **(env or {})}
    log = tempfile.TemporaryFile()  # the app's own output, shown if it does not start
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    proc.terminate()
    log.seek(0)
    raise SystemExit("app.py did not start:\n" + log.read().decode(errors="replace")[-3000:])


def visitor(url: str, requests: int, max_new_tokens: int, latencies: list, errors: list, deadline: float, n: int):
    import gradio_client

    try:
        client = gradio_client.Client(url, verbose=False)
        visitor_id, _ = client.predict(None, api_name="/visitor")
    except Exception as e:  # noqa: BLE001 - every failure is counted, none stops the others
        errors.append(f"connect: {type(e).__name__}: {e}")
        return
    for i in range(requests):
        if time.time() > deadline:
            errors.append("deadline passed")
            return
        begin = time.perf_counter()
        try:
            base, dpo, *_ = client.predict(visitor_id, PROMPTS[(n + i) % len(PROMPTS)], [], [], 0.6, 0.9,
                                           max_new_tokens, i, SYSTEM, api_name="/compare")
            if not base or not base[-1]["content"]:
                raise RuntimeError("empty base answer")
            latencies.append(time.perf_counter() - begin)
        except Exception as e:  # noqa: BLE001
            errors.append(f"{type(e).__name__}: {e}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,4,8", help="visitors at once, one level after another")
    parser.add_argument("--requests", type=int, default=4, help="Compare requests per visitor")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--deadline", type=float, default=300, help="seconds per level before giving up")
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    proc = start_app(port)
    rows = []
    failures = 0
    try:
        for level in (int(c) for c in args.concurrency.split(",")):
            latencies, errors = [], []
            deadline = time.time() + args.deadline
            begin = time.perf_counter()
            threads = [threading.Thread(target=visitor, args=(url, args.requests, args.max_new_tokens, latencies,
                                                              errors, deadline, n)) for n in range(level)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - begin
            failures += len(errors)
            lat = latencies or [float("nan")]
            rows.append(f"| {level} | {level * args.requests} | {len(errors)} | {statistics.median(lat):.2f} | "
                        f"{percentile(lat, 0.9):.2f} | {percentile(lat, 0.99):.2f} | {max(lat):.2f} | "
                        f"{len(latencies) / wall:.2f} |")
            for e in errors[:3]:
                print(f"  error at {level}: {e}", file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"Compare, {args.max_new_tokens} new tokens, sampling on; {os.cpu_count()} CPU cores, the embedded model\n")
    print("| visitors at once | requests | errors | p50 s | p90 s | p99 s | max s | answers/s |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
