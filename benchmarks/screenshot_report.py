"""Render a run's ``report.html`` in headless Chromium and save a screenshot: proof that it opens in a browser
and shows its figures.

    python -m benchmarks.screenshot_report runs/demo/<run_id> --out docs/report.png

Needs a Chromium binary (Debian: ``apt-get install chromium``; or pass ``--chromium``). The page is loaded from
the local file system with the flags a sandboxed, offline machine needs; the screenshot is taken after every
image has loaded. Prints one JSON line: the screenshot's path, size and the figures the page references.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=5000",
]


def screenshot(run_dir: Path, out: Path, chromium: str, width: int = 1200, height: int = 2200) -> dict:
    page = run_dir / "report.html"
    if not page.is_file():
        raise SystemExit(f"error: {page}: no report (build it with `stepback report {run_dir}`)")
    figures = re.findall(r'<img src="([^"]+)"', page.read_text())
    missing = [f for f in figures if not (run_dir / f).is_file()]
    if missing:
        raise SystemExit(f"error: {page}: figures missing: {', '.join(missing)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [
                chromium,
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                f"--screenshot={out.resolve()}",
                page.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    if proc.returncode != 0 or not out.is_file():
        raise SystemExit(f"error: chromium failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return {"screenshot": str(out), "bytes": out.stat().st_size, "figures": figures}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a run's local output folder (holding report.html)")
    ap.add_argument("--out", default="docs/report.png")
    ap.add_argument(
        "--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
    )
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--height", type=int, default=2200)
    args = ap.parse_args()
    print(json.dumps(screenshot(Path(args.run), Path(args.out), args.chromium, args.width, args.height)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
