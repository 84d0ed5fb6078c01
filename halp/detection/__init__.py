"""Detection: mmdet SSD detectors as prunable CNNs (needs the ``det`` extra: mmdet, mmengine, mmcv).

Import the submodules (``halp.detection.ssd``); this package imports nothing heavy by itself.
"""
