"""Checks run outside the bundles: the model zoo's checks (zoo_checks.py), the MONAI Label check."""
