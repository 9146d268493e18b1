"""Manifests: what a dataset is, before any video is read. Imports no other room of cmdcl_cache.

    format.py    the data model (VideoRecord, LabelSet, Manifest), its errors, id rules, built-in datasets
    io.py        reading a manifest folder (every line validated, all errors at once) and writing one
    prompts.py   label names as readable texts and the prompt template sets
    paths.py     a record's video file under --video-root
    demo.py      the demo set, rendered locally
    builders/    `cmdcl-cache manifest build`: COIN, Breakfast, Charades and a folder of videos
"""
