"""torchcodec (PyTorch's decoder, FFmpeg underneath): on the CPU in worker processes, or with NVDEC.

Exact seek mode: torchcodec scans the file once, then seeks to the keyframe before each requested
frame and decodes forward. The timestamps come from the same kind of scan (torchcodec's `Demuxer`, no
decoding), in presentation order, the order `get_frames_at` indexes. torchcodec applies rotation
metadata itself. Importing this module imports torch: only the torchcodec backends pay for it.

`TorchCodecCudaVideo` decodes with NVDEC into GPU memory and returns CUDA uint8 tensors [k, H, W, 3];
the pipeline's GPU decode threads resize and crop them there (decode.GpuDecodePool).
"""

from __future__ import annotations

from cmdcl_cache.extract.decoders.pyav_video import check_not_truncated


class TorchCodecVideo:
    backend = "torchcodec"
    device = "cpu"

    def __init__(self, path: str, threads: int = 1):
        from torchcodec.decoders import Demuxer, VideoDecoder
        self._decoder = VideoDecoder(path, seek_mode="exact", dimension_order="NHWC",
                                     num_ffmpeg_threads=max(1, int(threads)), device=self.device)
        meta = self._decoder.metadata
        self.num_frames = int(meta.num_frames)
        self.fps = float(meta.average_fps) if meta.average_fps else float("nan")
        index = Demuxer(path, streams=meta.stream_index).streams[0].scan()
        self.pts = index.pts_seconds.double().numpy()
        check_not_truncated(len(self.pts), meta.num_frames_from_header)
        self.key_indices = index.key_frame_indices.long().numpy()
        if len(self.pts) != self.num_frames:
            raise RuntimeError(f"torchcodec's scan found {len(self.pts)} frames, its decoder "
                               f"{self.num_frames}")
        self.decoded = None

    def get_batch(self, indices):
        return self._decoder.get_frames_at([int(i) for i in indices]).data.numpy()


class TorchCodecCudaVideo(TorchCodecVideo):
    backend = "torchcodec-cuda"
    device = "cuda"

    def get_batch(self, indices):
        return self._decoder.get_frames_at([int(i) for i in indices]).data   # stays on the GPU
