"""The private names of other libraries that clipx relies on, one module per library.

Each module wraps what clipx uses of a library beyond its documented API (``open_clip.py``,
``accelerate.py``, ``torch.py``; each module's docstring names them), so that a release that
renames or drops such a name breaks one small function, and ``tests/test_compat.py``, which checks
every name and what clipx expects it to do on the installed versions, says which. They import
nothing of clipx but its errors: they sit in the foundation layer, usable from every other.
"""
