"""Evaluation: segmentation metrics (gIoU, cIoU) under named conventions."""
