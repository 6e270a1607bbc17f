"""reattend: swap a pretrained transformer's softmax attention for a cheaper one and distil it back."""

from .modeling import register_auto_classes

register_auto_classes()

__version__ = "0.1.0"
