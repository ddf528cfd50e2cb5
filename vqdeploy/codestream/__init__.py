"""Code streams: a bundle's indices as compact bytes to store or send, and back.

Frames along the time (token) axis, inside each frame one segment per layer in order, so that a reader can take
the first k layers of a residual quantizer and skip the rest (one stream serves every bandwidth up to the one it
was written at).  Codes are packed at ceil(log2 K) bits, or range-coded with per-layer frequencies the bundle
measured on calibration data at export.  Every record carries a crc32; damage raises ``StreamError`` with the
offset and field, and what was read before it still decodes.  See ``stream`` for the API, ``records`` for the
bytes.
"""

from .entropy import FREQUENCIES_FILE, measure_frequencies
from .layout import CodeLayout
from .records import StreamError
from .stream import StreamReader, StreamSpec, StreamWriter

__all__ = ["StreamSpec", "StreamWriter", "StreamReader", "StreamError", "CodeLayout", "measure_frequencies",
           "FREQUENCIES_FILE"]
