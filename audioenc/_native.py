"""The optional native core. ``_C`` is None when the package was installed without it, or when
AUDIOENC_NO_EXT=1 disables it; ``import_error`` then says which (``audioenc info`` shows it)."""
import os

_C = None
import_error = None
if os.environ.get("AUDIOENC_NO_EXT", "0") != "1":
    try:
        from audioenc import _C  # noqa: F811
    except ImportError as exc:  # installed with AUDIOENC_NO_EXT=1, or not built yet
        import importlib.util

        if importlib.util.find_spec("audioenc._C") is None:
            import_error = "not built (AUDIOENC_NO_EXT=1 at install, or no C++ compiler then)"
        else:
            import_error = f"built, but it cannot load here ({exc})"  # e.g. another torch or Python
else:
    import_error = "disabled by AUDIOENC_NO_EXT=1"
