"""Extraction: video files to cached features with an open_clip model. Imports manifest/ and cache/,
never ingest/.

    decoders/      the backends (PyAV, decord, torchcodec), one class each
    decode.py      choosing a backend and its fallback, decoding one video's sampled frames
    pools.py       decode workers with a timeout (processes), or threads for NVDEC
    transform.py   open_clip's resize + crop, bit for bit, in the workers (no torch)
    encoder.py     the open_clip model: checks, seeded random weights, fixed-size batches
    texts.py       label texts through the text tower -> texts.h5 (`cmdcl-cache texts`)
    pipeline.py    `cmdcl-cache extract`: its configuration, ranks, the plan
    run.py         the decode / encode / commit loop, and features of files outside a manifest
"""
