"""The feature cache: its folder, its files, how they are written, read, checked and compared.

Imports manifest/ and the small pieces at the top of cmdcl_cache, never extract/ or ingest/: a cache is
read the same way whoever wrote it.

    provenance.py  what a cache was made with (CacheSpec, ImportSpec), compared here and nowhere else
    format.py      the shard and texts.h5 files: layout, checksums, reading
    writer.py      writing one shard crash-safely (journal, commit lines, finalize)
    folder.py      the cache folder contract (file names, --cache resolution) and the reader (Cache)
    sampling.py    which frames of a video are sampled (pure)
    verify.py      `cmdcl-cache verify`
    runlog.py      failures.jsonl, extract_log.jsonl and a run's outcome (exit status, summary line)
"""
