"""The segmentation pipeline shared by the fine-tuning bundles: task recipes, evaluation, reports."""
