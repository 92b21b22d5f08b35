"""Components shared by the Swin UNETR bundles of this collection.

Only what MONAI lacks lives here: each module says which MONAI piece it complements and why.
The bundle configs reference these parts with dotted ``_target_`` paths (``custom.networks.weights...``).
Inside this repository each bundle folder holds a ``custom`` link to this folder; a packaged or
copied-out bundle holds a real copy, so a bundle never reaches back into the repository.

This file imports nothing on purpose: ``import custom`` must stay cheap for MONAI Label and
``monai.bundle`` helpers that only need one module.
"""
