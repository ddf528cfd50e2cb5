"""Files a command writes: never over one of its inputs, and only complete.

An output is written to a temporary file beside its final name and renamed into place when the work succeeds,
so a failed run leaves neither a half-written file under the final name nor a changed earlier file there.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def check_output(output: str | Path, inputs: list[str | Path], what: str = "output") -> Path:
    """``output`` as a Path, after refusing one that is any of ``inputs`` (by name, or the same file by
    ``os.path.samefile``: a link to it), a directory, or a path whose directory does not exist."""
    output = Path(output)
    for source in inputs:
        source = Path(source)
        same = os.path.abspath(output) == os.path.abspath(source)
        if not same and output.exists() and source.exists():
            same = os.path.samefile(output, source)
        if same:
            raise ValueError(f"the {what} {output} is the input {source}: writing it would destroy the input; "
                             "choose another name")
    if output.is_dir():
        raise ValueError(f"the {what} {output} is a directory; give a file name")
    parent = output.parent
    if not parent.is_dir():
        raise ValueError(f"the {what}'s directory {parent} does not exist")
    return output


class AtomicOutput:
    """A temporary file beside ``path`` (created with the user's umask, like any new file) for the ``with``
    block; ``commit()`` renames it to ``path``, and leaving the block without a commit removes it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.temporary: Path | None = None
        self.committed = False

    def __enter__(self) -> AtomicOutput:
        while self.temporary is None:
            candidate = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.part")
            try:
                os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            except FileExistsError:
                continue
            self.temporary = candidate
        return self

    def commit(self) -> None:
        os.replace(self.temporary, self.path)
        self.committed = True

    def __exit__(self, *exc) -> None:
        if not self.committed:
            self.temporary.unlink(missing_ok=True)
