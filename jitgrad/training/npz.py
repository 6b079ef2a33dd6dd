"""Reading ``.npz`` archives the user hands us (datasets, checkpoints) without surprises.

``np.load`` answers a wrong file in many voices: a ``.npy`` file comes back as a
bare array (no ``.files``), other bytes are tried as a pickle ("contains pickled
data"), a truncated archive raises ``BadZipFile`` or ``EOFError``, a corrupt member
``zlib.error``. Here every one of them becomes one error naming the file.
"""

from __future__ import annotations

import os

import numpy as np

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members, an empty zip
_NPY_MAGIC = b"\x93NUMPY"


def read_npz(path: str | os.PathLike[str], what: str,
             error: type[Exception] = ValueError) -> dict[str, np.ndarray]:
    """Every array of the .npz archive at ``path``, read into memory (no pickles).

    Raises ``error`` with a message starting "{what} '{path}'" when the file is not
    an .npz archive or cannot be read in full.
    """
    name = f"{what} {str(path)!r}"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise error(f"{name} cannot be read: {e.strerror or e}") from None
    if head.startswith(_NPY_MAGIC):
        raise error(f"{name} is a single .npy array, not an .npz archive")
    if not head.startswith(_ZIP_MAGIC):
        raise error(f"{name} is not an .npz archive (it starts with {head!r}, not a zip "
                    "header)")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:
        # Any failure inside the archive means it is corrupt: BadZipFile, EOFError,
        # zlib.error, ValueError (a bad member header, an object array),
        # NotImplementedError (an unknown compression), MemoryError (a huge member)...
        raise error(f"{name} is corrupt ({type(e).__name__}: {e})") from None
