"""Region proposals. Import from the submodules:

* :mod:`rclip_core.models.proposals.offline`: the frozen offline Detectron2 RPNs of the official
  code (``rpn_*.pth``), ported with their checkpoint keys, and their proposal settings;
* :mod:`rclip_core.models.proposals.trainable`: a torchvision RPN on res4, trained with the
  detector where no offline RPN exists;
* :mod:`rclip_core.models.proposals.boxes`: random and sliding-window boxes.

Boxes read from files (ground truth / user boxes) are :mod:`rclip_core.data.boxes`.
"""
