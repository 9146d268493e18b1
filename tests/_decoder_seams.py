"""The tests' decoders, installed as a decoder hook (entry-point group `cmdcl_cache.decoder_hooks`, declared
by tests/cmdcl_test_seams-0.dist-info): found wherever tests/ is on the path, so in pytest, in the CLI
subprocesses the tests start with tests/ on PYTHONPATH, and in their spawned decode workers.

A decoder name, or $CMDCL_DECODER where none is given, selects a seam:
- "hang-test": decord, except that files whose name contains "hang" never return, as decord can on
  broken files (the timeout's test);
- "module:function": that function of the tests' own modules, e.g. "_extract_util:slow_decord".
Seams wrap decord and are recorded in the provenance as decord. Anything else: no seam (None).
"""

import importlib
import os
import time


def open_hang_test(path: str, threads: int = 1):
    from cmdcl_cache.extract.decoders.decord_video import DecordVideo

    if "hang" in os.path.basename(path):
        while True:          # what a decoder stuck in native code looks like from outside
            time.sleep(3600)
    return DecordVideo(path, threads)


def decoder_hook(name):
    seam = name if name is not None else os.environ.get("CMDCL_DECODER")
    if seam == "hang-test":
        return open_hang_test, "decord"
    if seam and ":" in seam:
        module, _, attr = seam.partition(":")
        return getattr(importlib.import_module(module), attr), "decord"
    return None
