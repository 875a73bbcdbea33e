"""A public Space that stays up: many visitors through gradio_client against a local app, memory and disk watched.

    python bench/soak.py [--visitors 60] [--at-once 4] [--pairs 8]

Starts `app.py` on a loopback port (only there: the URL is built here) with a tight retention policy (runs, adapters
and Gradio sessions), so that each bound is reached during the soak, and a folder of its own for the runs. Each visitor
loads the example, trains a tiny run (`--pairs` pairs, a few steps), chats, evaluates two prompts (`--eval-k` samples
of each per model) and leaves; every fifth reloads mid-run (a new client, the same visitor id), every seventh stops
mid-run, every ninth uploads a broken file first (refused, dataset kept), and the first visitors come back at the end,
after their runs were evicted (told so, not shown an error). It samples the app's RSS and the disk under the runs'
folder, reads the adapters loaded in the chat model and the Gradio sessions kept from the app's /health endpoint, counts
errors, and records Compare latency while a run trains. Bounded: a fixed number of visitors, a deadline for each, the
app terminated at the end. The last line is

    soak: visitors N, runs R, errors E, rss_mib A->B, disk_mib C->D, adapters_loaded K

with A and C read after the warm-up (the first `--at-once` visitors), B and D at the end, once no run is queued or
training; exit status 1 if E > 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from load import PROMPTS, SYSTEM, free_port, percentile, start_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dpo_space.space import folder_mib  # noqa: E402  (what the retention policy itself counts)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Soak:
    def __init__(self, url: str, pairs: int, deadline: float, eval_k: int = 1):
        self.url, self.pairs, self.deadline, self.eval_k = url, pairs, deadline, eval_k
        self.errors: list[str] = []
        self.runs = 0
        self.compare_while_training: list[float] = []
        self.lock = threading.Lock()
        self.visitors: list[str] = []

    def error(self, n: int, what: str):
        with self.lock:
            self.errors.append(f"visitor {n}: {what}")

    def client(self):
        import gradio_client

        return gradio_client.Client(self.url, verbose=False)

    def train_args(self, visitor: str) -> list:
        from dpo_space import ui
        from dpo_space.training import RunSettings

        values = ui.widget_values(RunSettings.for_model("embedded", num_train_epochs=1,
                                                        per_device_train_batch_size=4))
        return [visitor, "embedded", self.pairs, "人はどんなことをしてもらうと嬉しいですか?", *values]

    def wait_for_run(self, client, visitor: str, n: int, *, stop_after: float | None = None,
                     reload_after: float | None = None) -> tuple[str, object]:
        begin = time.time()
        while time.time() < self.deadline:
            status = client.predict(visitor, api_name="/status")[0]
            if not status.startswith(("queued", "waiting", "running")):
                return status, client  # the client of the page as it is now (a new one after a reload)
            if stop_after is not None and time.time() - begin > stop_after and status.startswith("running"):
                client.predict(visitor, api_name="/stop")
                stop_after = None
            if reload_after is not None and time.time() - begin > reload_after:
                client.close()  # the page reloads: its old session ends, a new one starts with the browser's id
                client = self.client()
                reload_after = None
            time.sleep(0.5)
        raise TimeoutError("the run did not end before the deadline")

    def visit(self, n: int, broken: Path):
        client = None
        try:
            client = self.client()
            visitor, _ = client.predict(None, api_name="/visitor")
            with self.lock:
                self.visitors.append(visitor)
            client.predict("わかりません (seed, extreme)", api_name="/load_example")
            if n % 9 == 0:  # a broken upload first: refused, the dataset kept
                import gradio_client

                _, report = client.predict(gradio_client.handle_file(str(broken)), api_name="/upload")
                if "not changed" not in report:
                    self.error(n, f"a broken upload was not refused: {report[:200]}")
            client.predict(*self.train_args(visitor), api_name="/train")
            status, client = self.wait_for_run(client, visitor, n, stop_after=1.0 if n % 7 == 0 else None,
                                               reload_after=1.0 if n % 5 == 0 else None)
            if not status.startswith(("done", "stopped")):
                self.error(n, f"run ended {status[:200]}")
                return
            with self.lock:
                self.runs += 1
            client.predict(visitor, PROMPTS[n % len(PROMPTS)], [], [], 0.6, 0.9, 64, n, SYSTEM, api_name="/compare")
            table, summary, _, _ = client.predict(visitor, "\n".join(PROMPTS[:2]), 0.6, 0.9, 32, 0, SYSTEM, [],
                                                  self.eval_k, api_name="/evaluate")
            if len(table["data"]) != 2:
                self.error(n, "evaluation did not answer both prompts")
        except Exception as e:  # noqa: BLE001 - every failure is counted, none stops the others
            self.error(n, f"{type(e).__name__}: {str(e)[:300]}")
        finally:
            if client is not None:
                client.close()  # the visitor leaves: the tab closes, and Gradio drops the session's state

    def chat_while_training(self, stop: threading.Event):
        """Compare latency, sampled while runs train (the line is rarely empty during the soak)."""
        try:
            client = self.client()
            visitor, _ = client.predict(None, api_name="/visitor")
            while not stop.is_set() and time.time() < self.deadline:
                begin = time.perf_counter()
                client.predict(visitor, PROMPTS[0], [], [], 0.6, 0.9, 64, 0, SYSTEM, api_name="/compare")
                with self.lock:
                    self.compare_while_training.append(time.perf_counter() - begin)
                time.sleep(2)
        except Exception as e:  # noqa: BLE001
            self.error(-1, f"chat while training: {type(e).__name__}: {e}")

    def come_back(self, visitor: str, n: int):
        """A visitor whose run was evicted: their page says so, Compare answers from the base and names why."""
        try:
            client = self.client()
            status = client.predict(visitor, api_name="/status")[0]
            base, dpo, *_ = client.predict(visitor, PROMPTS[0], [], [], 0.6, 0.9, 32, 0, SYSTEM, api_name="/compare")
            if not base[-1]["content"]:
                self.error(n, "no base answer on coming back")
            return status
        except Exception as e:  # noqa: BLE001
            self.error(n, f"coming back: {type(e).__name__}: {e}")
            return ""


def health(client) -> dict:
    return json.loads(client.predict(api_name="/health"))


def wait_idle(watcher, seconds: float = 120) -> None:
    """Until no run is queued or training (bounded): memory is compared between idle moments, not mid-run."""
    end = time.time() + seconds
    while time.time() < end:
        h = health(watcher)
        if not h["queued"] and not h["running"]:
            return
        time.sleep(1)


def run(visitors: int, at_once: int, pairs: int, minutes: float, disk_budget_mib: float = 20,
        max_adapters: int = 8, eval_k: int = 1, sessions: int = 16) -> dict:
    import gradio_client

    with tempfile.TemporaryDirectory() as tmp:
        runs_dir = Path(tmp) / "space"
        broken = Path(tmp) / "broken.json"
        broken.write_text('[{"prompt": "q", "chosen": "a"}]', encoding="utf-8")
        port = free_port()
        env = {"DPO_SPACE_ROOT": str(runs_dir), "DPO_SPACE_MODEL": "embedded", "DPO_SPACE_RUNS_PER_VISITOR": "1",
               "DPO_SPACE_DISK_BUDGET_MIB": str(disk_budget_mib), "DPO_SPACE_MAX_ADAPTERS": str(max_adapters),
               "DPO_SPACE_MAX_QUEUE": str(at_once), "DPO_SPACE_SESSIONS": str(sessions)}
        proc = start_app(port, env=env)
        url = f"http://127.0.0.1:{port}/"
        soak = Soak(url, pairs, deadline=time.time() + minutes * 60, eval_k=eval_k)
        watcher = gradio_client.Client(url, verbose=False)
        stop_chat = threading.Event()
        chatter = threading.Thread(target=soak.chat_while_training, args=(stop_chat,), daemon=True)
        samples, first = [], None

        def measure() -> tuple:  # (RSS MiB, runs' folder MiB, adapters loaded, Gradio sessions kept)
            counts = health(watcher)
            return rss_mib(proc.pid), folder_mib(runs_dir), counts["adapters_loaded"], counts["sessions"]

        try:
            chatter.start()
            for start in range(0, visitors, at_once):
                wave = [threading.Thread(target=soak.visit, args=(n, broken), daemon=True)
                        for n in range(start, min(visitors, start + at_once))]
                for t in wave:
                    t.start()
                for t in wave:
                    t.join(timeout=max(1.0, soak.deadline - time.time()))
                sample = measure()
                samples.append(sample)
                first = first or sample  # after the warm-up wave
                if time.time() > soak.deadline:
                    soak.error(-1, "the soak's deadline passed")
                    break
            stop_chat.set()
            chatter.join(timeout=60)
            statuses = [soak.come_back(v, n) for n, v in enumerate(soak.visitors[:3])]
            if not any("removed to make room" in s for s in statuses):
                soak.error(-1, f"no early visitor was told their run was evicted: {statuses}")
            wait_idle(watcher)
            last = measure()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    latencies = soak.compare_while_training or [float("nan")]
    return {"visitors": visitors, "runs": soak.runs, "rss_series": [round(x[0]) for x in samples + [last]],
            "errors": soak.errors, "first": first, "last": last,
            "max_adapters_seen": max(s[2] for s in samples + [last]),
            "max_sessions_seen": max(s[3] for s in samples + [last]),
            "compare_p50": statistics.median(latencies), "compare_p90": percentile(latencies, 0.9),
            "compare_max": max(latencies)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--visitors", type=int, default=60)
    parser.add_argument("--at-once", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=20, help="the whole soak's deadline")
    parser.add_argument("--disk-budget-mib", type=float, default=20, help="the app's retention budget for runs")
    parser.add_argument("--eval-k", type=int, default=1, help="samples per prompt and model in each Evaluate")
    parser.add_argument("--sessions", type=int, default=16, help="the Gradio sessions the app keeps")
    args = parser.parse_args(argv)
    result = run(args.visitors, args.at_once, args.pairs, args.minutes, args.disk_budget_mib, eval_k=args.eval_k,
                 sessions=args.sessions)
    for e in result["errors"][:10]:
        print(f"  error: {e}", file=sys.stderr)
    (a, c, *_), (b, d, k, _) = result["first"], result["last"]
    print(f"Compare while runs train: p50 {result['compare_p50']:.2f} s, p90 {result['compare_p90']:.2f} s, "
          f"max {result['compare_max']:.2f} s; most adapters loaded at once: {result['max_adapters_seen']}; "
          f"most Gradio sessions kept: {result['max_sessions_seen']}")
    print("RSS MiB after each wave of visitors: " + " ".join(map(str, result["rss_series"])))
    print(f"soak: visitors {result['visitors']}, runs {result['runs']}, errors {len(result['errors'])}, "
          f"rss_mib {a:.0f}->{b:.0f}, disk_mib {c:.0f}->{d:.0f}, adapters_loaded {k}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
