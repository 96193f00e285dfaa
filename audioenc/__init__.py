"""audioenc: fast inference for pre-trained audio encoders."""
__version__ = "0.1.0"
