"""Training tasks of the one loop (:mod:`rclip_core.engine.trainer`): RegionCLIP region-text
pretraining, CLIP image-text training and detector fine-tuning."""
