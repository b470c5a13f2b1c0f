"""rclip_core: the RegionCLIP library (region encoders, text embeddings, proposals,
pretraining, detection, evaluation). It never prints; failures are RclipError's."""

__version__ = "0.1.0"

from rclip_core.errors import RclipError, InputError, RuntimeFailure  # noqa: E402,F401
