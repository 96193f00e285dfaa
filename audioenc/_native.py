"""The optional native core. ``_C`` is None when the package was installed without it."""
import os

_C = None
import_error = None
if os.environ.get("AUDIOENC_NO_EXT", "0") != "1":
    try:
        from audioenc import _C  # noqa: F811
    except ImportError as exc:  # installed with AUDIOENC_NO_EXT=1, or not built yet
        import_error = str(exc)
else:
    import_error = "disabled by AUDIOENC_NO_EXT=1"
