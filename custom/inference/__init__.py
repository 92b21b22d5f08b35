"""What inference adds around the sliding window: memory plan, body crop, ensembles and mirroring, per-case outputs
(statistics, preview, DICOM SEG). The segmentation pipeline (``custom.segmentation.pipeline``) builds them."""
