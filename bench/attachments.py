"""What a picture or a file costs a page message: a 10 MB PDF and a 12-megapixel photo, in-process (the app with
a fake backend, its SQLite store on disk), each sent `--runs` times into a new conversation.

For each: the time from the request to the answer's first byte, the time spent decoding on the thread pool
(off the hub), the hub's longest pause meanwhile (a 5 ms repeating timer), the bytes stored (the original,
plus a downscaled copy for a picture) and the bytes sent to the model for it. Beside them, a text-only
message as the baseline.

    python bench/attachments.py [--runs 5]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from jarvis import attachments, state  # noqa: E402
from jarvis.factory import create_app  # noqa: E402
from jarvis.settings import Settings  # noqa: E402
from tests.fake_backend import FakeBackend  # noqa: E402
from tests.hub import hub_gaps  # noqa: E402
from tests.test_attachments import big_pdf, file_part, image_part  # noqa: E402


def photo(width: int = 4000, height: int = 3000) -> bytes:
    """A 12-megapixel JPEG that compresses like a photo: smooth gradients and some noise."""
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    noise = Image.frombytes("L", (width // 4, height // 4), random.randbytes(width * height // 16))
    image.paste(noise.resize((width, height)).convert("RGB"), (0, 0), Image.new("L", (width, height), 40))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def measure(client, backend, content, runs: int) -> dict:
    timings, hub, decode = [], [], []
    original = attachments._decode_all

    def timed(*args):
        started = time.perf_counter()
        try:
            return original(*args)
        finally:
            decode.append((time.perf_counter() - started) * 1000)

    attachments._decode_all = timed
    try:
        for _ in range(runs):
            conversation_id = client.post("/api/conversations", json={}).json["id"]
            body = json.dumps({"content": content})
            started = time.perf_counter()
            with hub_gaps() as gaps:
                response = client.post(f"/api/conversations/{conversation_id}/messages", data=body,
                                       content_type="application/json")
                first = next(iter(response.response))
                timings.append((time.perf_counter() - started) * 1000)
            assert first and response.status_code == 200
            response.get_data()
            hub.append(max(gaps, default=0) * 1000)
    finally:
        attachments._decode_all = original
    sent = json.dumps(backend.requests[-1].body["messages"][-1]["content"]).encode()
    return {"first byte": statistics.median(timings), "decode": statistics.median(decode) if decode else 0.0,
            "hub": max(hub), "sent": len(sent), "conversation": conversation_id}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    backend = FakeBackend(["ok"])
    with tempfile.TemporaryDirectory(prefix="jarvis-bench-attachments-") as data:  # removed at the end
        return run(runs, backend, create_app(Settings(data_dir=data, titles=False), backend=backend))


def run(runs: int, backend, app) -> int:
    client = app.test_client()
    pdf, jpeg = big_pdf("The total is 42"), photo()
    cases = [("text only (baseline)", "What is the total?"),
             (f"PDF, {len(pdf) / 1e6:.1f} MB (a text page and a photo)",
              [{"type": "text", "text": "What is the total?"}, file_part("report.pdf", pdf, "application/pdf")]),
             (f"photo, 4000 x 3000 JPEG, {len(jpeg) / 1e6:.1f} MB",
              [{"type": "text", "text": "What is this?"}, image_part(jpeg, "image/jpeg")])]
    print(f"A page message with a picture or a file, in-process, SQLite; medians of {runs} (ms, bytes)\n")
    print("| message | to first byte | decoding (off the hub) | hub's longest pause | bytes stored | "
          "bytes sent for it |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, content in cases:
        result = measure(client, backend, content, runs)
        with app.app_context():
            stored = state.store().conversation_files(result["conversation"])
        kept = sum(len(row["data"]) + len(row["sent"] or b"") for row in stored)
        print(f"| {name} | {result['first byte']:.0f} | {result['decode']:.0f} | {result['hub']:.1f} | "
              f"{kept} | {result['sent']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
