"""Audio codec runtime: audio files to code streams and back through an audio bundle, long inputs in chunks of
bounded memory (``chunking``), files through soundfile (``files``)."""

from .chunking import windowed
from .files import CodecRun, compress, decode_blocks, decompress, encode_blocks

__all__ = ["compress", "decompress", "encode_blocks", "decode_blocks", "windowed", "CodecRun"]
