"""Inference: a decoding policy, support sets, label maps of images and volumes (every slice or sparse), native
tiles, folders, and video propagation."""

from .folder import FolderSegmenter
from .policy import DecodePolicy
from .slices import as_slices, encode_slices, label_slices, segment_image, to_label
from .sparse import sparse_slice_logits
from .support import SupportSet, encode_samples
from .tiles import NativeTileInferer, segment_tiled

__all__ = [
    "DecodePolicy",
    "FolderSegmenter",
    "NativeTileInferer",
    "SupportSet",
    "as_slices",
    "encode_samples",
    "encode_slices",
    "label_slices",
    "segment_image",
    "segment_tiled",
    "sparse_slice_logits",
    "to_label",
]
