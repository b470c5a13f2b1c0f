"""Every weights file format, above :mod:`rclip_core.models` (which reads no file).

``io`` safe reading and writing, downloads; ``native`` the rclip layout (one prefix table) and
saving; ``official`` the official RegionCLIP / Detectron2 / OpenAI key maps; ``registry`` the
named models with their sha256; ``loaders`` models, offline RPNs, class embeddings and
detectors from any of these; ``inspect`` what a file holds (``rclip weights info``).
"""
