"""Features that come from elsewhere, and features that leave. Imports manifest/ and cache/, never
extract/.

    sources.py     the files `cmdcl-cache import` reads (.npy/.npz/.safetensors per video, or HDF5)
    plan.py        which source holds each video, checks, the sources' sha256, refusals
    importer.py    `cmdcl-cache import`: its configuration and the run
    texts.py       label text embeddings from a file (`cmdcl-cache texts --from-file`)
    export.py      `cmdcl-cache export`: one .npy per video
    synthetic.py   a cache from arrays (tests and benchmarks)
"""
