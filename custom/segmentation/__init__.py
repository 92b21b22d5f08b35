"""The segmentation pipeline shared by the fine-tuning bundles: task recipes, chains, evaluation, reports, folds.

What inference adds around it (memory plan, body crop, ensembles, per-case outputs) is ``custom.inference``."""
