"""What one hostile tenant's webhook receivers cost the service and the other tenants.

A tenant submits jobs whose webhooks go to receivers that answer with a gzip bomb (256 MB unpacked)
or send their reply's headers a byte every 4 s; once they have ended, another tenant's job runs with a
webhook to a receiver that answers at once. Measured: the webhook worker's peak RSS, and how long after
the good job ended its webhook arrived. With `--baseline TREE` the same run is made first with another
checkout's code (e.g. `git worktree add /tmp/base <commit>`), so both figures come from one run.

    python benchmarks/hostile_tenant.py --baseline /tmp/base --out benchmarks/results/hostile-tenant-DATE.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.benchstack import ROOT, BenchStack, machine
from tests.conftest import Receiver
from tests.hostile import Hostile

KEYS = {"evil": "key-evil-0123456789", "good": "key-good-0123456789"}


def _png(mode: str, size: tuple[int, int], color: int | tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _job(webhook: str) -> dict[str, Any]:
    return {"prompt": "x", "image": _png("RGB", (64, 48), (90, 120, 200)), "mask": _png("L", (64, 48), 255),
            "num_inference_steps": 2, "webhook": webhook}  # fmt: skip


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run(tree: Path, bombs: int, tarpits: int, wait_s: float) -> dict[str, Any]:
    bomb, tarpit, good = Hostile("bomb"), Hostile("header-tarpit", every_s=4.0), Receiver()
    keys = ",".join(f"{t}:{k}" for t, k in KEYS.items())
    with BenchStack(tree, api_keys=keys, webhook_allow_private=True) as st:
        st.start_api()
        st.start_worker()
        hooks = st.start("webhooks", "webhooks")
        time.sleep(3)
        start_mb, peak = _rss_mb(hooks.pid), [0.0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.1):
                peak[0] = max(peak[0], _rss_mb(hooks.pid))

        threading.Thread(target=sample, daemon=True).start()
        with httpx.Client(base_url=st.base, timeout=30) as c:
            evil = {"authorization": f"Bearer {KEYS['evil']}"}
            ids = [c.post("/v1/jobs", headers=evil, json=_job(url)).json()["id"]
                   for url in [bomb.url("/hook")] * bombs + [tarpit.url("/hook")] * tarpits]  # fmt: skip
            for job_id in ids:
                while c.get(f"/v1/jobs/{job_id}", headers=evil).json()["status"] not in ("succeeded", "failed"):
                    time.sleep(0.2)
            time.sleep(2)  # their deliveries are under way
            good_h = {"authorization": f"Bearer {KEYS['good']}"}
            job_id = c.post("/v1/jobs", headers=good_h, json=_job(good.url("/hook"))).json()["id"]
            while (job := c.get(f"/v1/jobs/{job_id}", headers=good_h).json())["status"] not in ("succeeded", "failed"):
                time.sleep(0.1)
            ended = datetime.fromisoformat(job["finished_at"].replace("Z", "+00:00")).timestamp()
            arrived = good.arrival("/hook", job_id, wait_s)
        stop.set()
        alive = hooks.poll() is None
    bomb.stop()
    tarpit.stop()
    good.server.shutdown()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True)
    return {
        "tree": str(tree), "commit": commit.stdout.strip(), "bomb_jobs": bombs, "tarpit_jobs": tarpits,
        "webhooks_rss_start_mb": round(start_mb, 1), "webhooks_rss_peak_mb": round(peak[0], 1),
        "webhooks_worker_alive": alive,
        "other_tenant_webhook_delay_s": None if arrived is None else round(arrived - ended, 2),
        "waited_s": wait_s,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, help="another checkout to run first, for comparison")
    ap.add_argument("--bombs", type=int, default=12)
    ap.add_argument("--tarpits", type=int, default=12)
    ap.add_argument("--wait", type=float, default=60.0, help="how long to wait for the other tenant's webhook")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    runs = [run(tree, args.bombs, args.tarpits, args.wait) for tree in [args.baseline, ROOT] if tree]
    result = {"machine": machine(), "date": datetime.now().isoformat(timespec="seconds"), "runs": runs}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
