"""What the reference scripts (reference_llmcompressor.py, reference_gptqmodel.py) share. They run in their own
environments, where quantize is not installed, so this file imports nothing from it."""

import argparse
from pathlib import Path


def peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def parser() -> argparse.ArgumentParser:
    """BASE_DIR CALIB.pt OUT_DIR [--group-size N] [--asym], as bench/reference.py calls every reference."""
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("calib")
    ap.add_argument("out")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--asym", action="store_true")
    return ap
