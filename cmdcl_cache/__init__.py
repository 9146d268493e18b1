"""cmdcl_cache: manifests, decoding, frame sampling, CLIP encoding and the HDF5 feature cache."""

__version__ = "0.1.0"
