"""Loading Swin encoder weights in the layout of the paper's released ``model_swinvit.pt``.

Why this exists: MONAI's ``SwinUNETR.load_from`` reads that layout but says nothing about what it
loaded, ignores every extra tensor silently and dies on the first missing key with a bare
``KeyError``; the research scripts strip ``module.`` and load non-strictly, which for this file
matches *nothing* and raises no error. Here every encoder tensor of the network must be matched
(same name and shape) or loading fails with the list of what is wrong; tensors the network has no
place for (the final norm, the SSL heads) are reported as ignored. The copy itself is MONAI's
``copy_model_state`` with an explicit key map.

Released layout (``{"state_dict": {...}}``), 126 encoder tensors for depths (2, 2, 2, 2)::

    module.patch_embed.proj.{weight,bias}
    module.layers{1..4}.0.blocks.{0,1}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.{weight,bias}
    module.layers{1..4}.0.blocks.{0,1}.attn.relative_position_{bias_table,index}
    module.layers{1..4}.0.downsample.{reduction.weight,norm.weight,norm.bias}

MONAI names the MLP layers ``linear1``/``linear2`` and keeps the encoder under ``swinViT.``.

The merging order travels with the weights. MONAI 1.5 changed the order in which the patch-merging
layers concatenate their eight sub-samples (``custom.networks.options``); weights work only in the order they
were trained with, and nothing in the tensors tells the two apart ("matched 126 of 126" either way).
Files this collection writes record it (``{"recipe": {"legacy_merging": ...}}``, ``custom.networks.recipe``); a
file in the released layout without that record is the paper's release, trained with the old order.
:func:`resolve_legacy_merging` picks the order from the file before the network is built (the bundles'
``legacy_merging: null``) and logs it; an explicit ``legacy_merging`` that contradicts the file is
refused (``--accept_recipe_mismatch True`` accepts it deliberately, with a warning), and
:func:`load_swinvit_weights` refuses to load into a network built with the other order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from monai.networks.utils import copy_model_state

from custom.networks.options import downsample_option
from custom.networks.recipe import RECIPE_KEY, legacy_merging_of, recipe_values
from custom.utils import bare_module, require_bool

__all__ = [
    "ENCODER_PREFIX",
    "LoadReport",
    "downsample_for",
    "merging_record",
    "resolve_legacy_merging",
    "PretrainedWeightsError",
    "load_swinvit_weights",
    "prepare_network",
    "released_to_monai_key",
    "monai_to_released_key",
    "validate_optional_path",
    "verified_path",
    "read_large_files",
    "LARGE_FILES",
]

logger = logging.getLogger(__name__)

#: where ``monai.networks.nets.SwinUNETR`` keeps its Swin transformer encoder
ENCODER_PREFIX = "swinViT."
_RELEASED_PREFIX = "module."
_MLP_RENAMES = ((".mlp.fc1.", ".mlp.linear1."), (".mlp.fc2.", ".mlp.linear2."))


class PretrainedWeightsError(ValueError):
    """The weight file does not provide every encoder tensor of the network."""


@dataclass
class LoadReport:
    """What :func:`load_swinvit_weights` did: counts first, then the names."""

    path: str
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    merging: str = ""

    @property
    def expected(self) -> int:
        return len(self.matched) + len(self.missing) + len(self.shape_mismatch)

    def summary(self) -> str:
        text = (
            f"{self.path}: matched {len(self.matched)} of {self.expected} encoder tensors; "
            f"ignored {len(self.ignored)} tensors the network has no place for"
        )
        if self.ignored:
            text += f" ({_abbrev(self.ignored)})"
        if self.merging:
            text += f"; patch merging in {self.merging}"
        return text


def _abbrev(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... {len(names) - limit} more" if len(names) > limit else "")


def released_to_monai_key(key: str) -> str | None:
    """Map a key of the released layout to ``SwinUNETR``'s name, or None when it is no encoder key.

    >>> released_to_monai_key("module.layers1.0.blocks.0.mlp.fc1.weight")
    'swinViT.layers1.0.blocks.0.mlp.linear1.weight'
    >>> released_to_monai_key("module.rotation_head.weight") is None
    True
    """
    name = key[len(_RELEASED_PREFIX) :] if key.startswith(_RELEASED_PREFIX) else key
    if name.startswith(ENCODER_PREFIX):  # already MONAI-named (a SwinUNETR state_dict)
        name = name[len(ENCODER_PREFIX) :]
    if not (name.startswith("patch_embed.") or name.startswith("layers")):
        return None
    for old, new in _MLP_RENAMES:
        name = name.replace(old, new)
    return ENCODER_PREFIX + name


def monai_to_released_key(key: str) -> str | None:
    """Inverse of :func:`released_to_monai_key` for ``swinViT.*`` keys (used to export encoders).

    >>> monai_to_released_key("swinViT.layers2.0.blocks.1.mlp.linear2.bias")
    'module.layers2.0.blocks.1.mlp.fc2.bias'
    """
    if not key.startswith(ENCODER_PREFIX):
        return None
    name = key[len(ENCODER_PREFIX) :]
    for old, new in _MLP_RENAMES:
        name = name.replace(new, old)
    return _RELEASED_PREFIX + name


def validate_optional_path(value: object, name: str) -> str | None:
    """Accept None or an existing file path; refuse the strings a shell user means as None.

    Raises:
        ValueError: ``value`` is ``"null"``, ``"none"``, ``"false"`` or empty (the bundle CLI reads
            values as Python literals: write ``None``).
        FileNotFoundError: ``value`` names no file.
    """
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a file path or None, got {value!r}.")
    text = os.fspath(value)
    if text.strip().lower() in {"", "null", "none", "false"}:
        raise ValueError(
            f"{name}={text!r}: command-line values are Python literals; write `--{name} None` to train without it."
        )
    if not os.path.isfile(text):
        raise FileNotFoundError(f"{name}: no such file: {os.path.abspath(text)}")
    return text


#: the model zoo's listing of a bundle's downloadable files, at the bundle root
LARGE_FILES = "large_files.yml"


def read_large_files(bundle_root: str | os.PathLike) -> list | None:
    """The ``large_files:`` entries of ``<bundle_root>/large_files.yml``; None when the bundle has no listing.

    The one reader of the listing: :func:`verified_path` checks files against it, ``ci/zoo_checks.py``
    checks each entry's fields. An empty file or one without ``large_files:`` lists nothing (``[]``).

    Raises:
        ValueError: the file is not YAML, or not a mapping whose ``large_files`` is a list.
    """
    import yaml

    listing = Path(bundle_root) / LARGE_FILES
    if not listing.is_file():
        return None
    try:
        data = yaml.safe_load(listing.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{listing}: not valid YAML ({e})") from e
    entries = (data or {}).get("large_files", []) if isinstance(data, (dict, type(None))) else None
    if not isinstance(entries, list):
        raise ValueError(f"{listing}: expected a `large_files:` list of {{path, url, hash_val, hash_type}}")
    return entries


def verified_path(path: str, bundle_root: str) -> str:
    """Return ``path`` after checking it against ``<bundle_root>/large_files.yml``, where it is listed there.

    The model zoo's ``large_files.yml`` lists downloadable files as ``path``, ``url``, ``hash_val``,
    ``hash_type``. A listed file whose checksum differs (a partial download, a swapped file) is refused
    before anything is loaded from it; MONAI's ``check_hash`` computes the checksum. Files not listed,
    or a bundle without the file, pass unchanged.

    Raises:
        ValueError: the file's checksum does not match its entry, or the listing is not readable
            (:func:`read_large_files`).
    """
    if not os.path.isfile(path):
        return path
    from monai.apps.utils import check_hash

    for entry in read_large_files(bundle_root) or []:
        if os.path.realpath(os.path.join(bundle_root, entry.get("path", ""))) != os.path.realpath(path):
            continue
        hash_type = entry.get("hash_type", "md5")
        if entry.get("hash_val") and not check_hash(path, entry["hash_val"], hash_type):
            raise ValueError(
                f"{path}: {hash_type} checksum does not match large_files.yml ({entry['hash_val']}): "
                "a partial download or another file; download it again"
            )
    return path


def _state_of(checkpoint: object) -> object:
    """The tensors of a weight file: ``{"state_dict": ...}``, ``{"model": ...}`` (a model.pt) or a bare state_dict."""
    if isinstance(checkpoint, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(checkpoint.get(key), Mapping):
                return checkpoint[key]
    return checkpoint


def _record_of(checkpoint: object) -> tuple[bool | None, str]:
    """(legacy_merging the file was trained with, or None when unknown; why) from a loaded weight file."""
    recipe = checkpoint.get(RECIPE_KEY) if isinstance(checkpoint, Mapping) else None
    recorded = recipe_values(recipe).get("legacy_merging") if isinstance(recipe, Mapping) else None
    if isinstance(recorded, bool):
        return recorded, f"recorded in the file by {recipe.get('bundle')} {recipe.get('version')}"
    state = _state_of(checkpoint)
    if isinstance(state, Mapping) and f"{_RELEASED_PREFIX}patch_embed.proj.weight" in state:
        return True, "released layout without a merging-order record: the paper's release, trained with MONAI < 1.5"
    return None, "no merging-order record and not the released layout"


def merging_record(path: str | os.PathLike) -> tuple[bool | None, str]:
    """The patch-merging order the weight file ``path`` was trained with, without loading its tensors.

    Returns:
        ``(legacy_merging, why)``: True for MONAI < 1.5's order (``custom.networks.options.LegacyPatchMerging``),
        False for MONAI's ``"merging"``, None when the file does not say (a bare state_dict in MONAI's
        names without a recipe).
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # torch's legacy (non-zip) format cannot be memory-mapped
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return _record_of(checkpoint)


def _order(legacy: bool | None) -> str:
    return {True: "MONAI < 1.5's order (legacy_merging True)", False: "MONAI's order (legacy_merging False)"}.get(
        legacy, "unknown order"
    )


def resolve_legacy_merging(
    legacy_merging: bool | None, pretrained_path: str | None = None, accept_mismatch: bool = False
) -> bool:
    """The patch-merging order to build the network with: the one ``pretrained_path`` was trained with.

    Args:
        legacy_merging: None ("from the weights", the bundles' default), or True/False given by the user.
        pretrained_path: the encoder weights the network will start from, or None (from scratch).
        accept_mismatch: let an explicit ``legacy_merging`` that contradicts the file through, with a warning.

    Returns:
        True for MONAI < 1.5's order, False for MONAI's. None with no file, or with a file that records
        nothing, gives False (MONAI's order; the log says so).

    Raises:
        TypeError: ``legacy_merging`` is neither None nor a bool (``--legacy_merging false`` arrives as a string).
        ValueError: ``legacy_merging`` contradicts the file's order and ``accept_mismatch`` is False.
    """
    require_bool(legacy_merging, "legacy_merging", none="from the weights")
    require_bool(accept_mismatch, "accept_recipe_mismatch")
    path = validate_optional_path(pretrained_path, "pretrained_path")
    if path is None:
        chosen = bool(legacy_merging)
        logger.info(f"no pretrained_path: patch merging in {_order(chosen)}")
        return chosen
    recorded, why = merging_record(path)
    if recorded is None:
        chosen = bool(legacy_merging)
        logger.warning(
            f"{path}: {why}; patch merging in {_order(chosen)} "
            f"({'as given' if legacy_merging is not None else 'the default'}): pass --legacy_merging True "
            "if the file was trained with MONAI < 1.5's order"
        )
        return chosen
    if legacy_merging is None or legacy_merging == recorded:
        logger.info(f"{path}: {why}; patch merging in {_order(recorded)}")
        return recorded
    text = (
        f"{path} was trained with patch merging in {_order(recorded)} ({why}), "
        f"but the config says legacy_merging={legacy_merging}"
    )
    if not accept_mismatch:
        raise ValueError(
            f"{text}: the weights would load into a network that concatenates their sub-samples in another order. "
            "Pass --legacy_merging None to follow the file, or --accept_recipe_mismatch True to do this deliberately."
        )
    logger.warning(f"{text}; --accept_recipe_mismatch True: building it in {_order(legacy_merging)} anyway")
    return legacy_merging


def downsample_for(
    legacy_merging: bool | None, pretrained_path: str | None = None, accept_mismatch: bool = False
) -> str | type[torch.nn.Module]:
    """The ``downsample`` argument of ``SwinUNETR`` in the merging order of ``pretrained_path``.

    :func:`resolve_legacy_merging` then ``custom.networks.options.downsample_option``; the bundles' train configs
    call it from ``network_def`` so that the order is settled before the network is built.
    """
    return downsample_option(resolve_legacy_merging(legacy_merging, pretrained_path, accept_mismatch))


def load_swinvit_weights(
    network: torch.nn.Module, path: str | os.PathLike, strict: bool = True, accept_mismatch: bool = False
) -> LoadReport:
    """Copy Swin encoder weights from a released-layout file into a ``SwinUNETR``.

    Args:
        network: a ``monai.networks.nets.SwinUNETR`` (or a DDP wrapper of one).
        path: ``model_swinvit.pt`` from the paper's release or from this collection's SSL bundle.
            ``{"state_dict": {...}}`` or a bare state_dict; ``module.`` prefixes optional.
        strict: raise when any encoder tensor of ``network`` is missing from the file or has another
            shape. With ``strict=False`` the matched tensors are still loaded and the gaps logged.
        accept_mismatch: load even when ``network`` merges patches in another order than the file was
            trained with (:func:`merging_record`), with a warning, instead of refusing.

    Returns:
        a :class:`LoadReport`; its ``summary()`` is also logged.

    Raises:
        PretrainedWeightsError: ``strict`` and not every encoder tensor was matched, or the file holds
            no encoder tensor at all (the message lists what is missing or mis-shaped); or the network's
            merging order is not the file's (the message names ``legacy_merging``).
    """
    path = os.fspath(path)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    recorded, why = _record_of(loaded)
    checkpoint = _state_of(loaded)
    if not isinstance(checkpoint, Mapping):
        raise PretrainedWeightsError(
            f"{path}: expected a state_dict (or {{'state_dict': ...}}), got {type(checkpoint)}."
        )

    model = bare_module(network)
    dst = model.state_dict()
    encoder_keys = [k for k in dst if k.startswith(ENCODER_PREFIX)]
    if not encoder_keys:
        raise PretrainedWeightsError(f"the network has no {ENCODER_PREFIX!r} encoder: is it a SwinUNETR?")

    report = LoadReport(path=path)
    mapped: dict[str, torch.Tensor] = {}
    for key, value in checkpoint.items():
        new_key = released_to_monai_key(key)
        if new_key is None or new_key not in dst:
            report.ignored.append(key)
        elif not isinstance(value, torch.Tensor) or value.shape != dst[new_key].shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            report.shape_mismatch.append(f"{key} {shape} vs network {tuple(dst[new_key].shape)}")
        else:
            mapped[new_key] = value
    mismatched = {s.split(" ")[0] for s in report.shape_mismatch}
    report.missing = [k for k in encoder_keys if k not in mapped and monai_to_released_key(k) not in mismatched]

    if not mapped or (strict and (report.missing or report.shape_mismatch)):
        problems = []
        if report.missing:
            problems.append(f"{len(report.missing)} missing ({_abbrev(report.missing)})")
        if report.shape_mismatch:
            problems.append(f"{len(report.shape_mismatch)} of another shape ({_abbrev(report.shape_mismatch, 3)})")
        hint = ""
        if report.shape_mismatch and any("patch_embed" in s for s in report.shape_mismatch):
            hint = " The file was trained with another feature_size or in_channels: set --feature_size to match it."
        raise PretrainedWeightsError(
            f"{path}: matched {len(mapped)} of {len(encoder_keys)} encoder tensors; "
            + ("; ".join(problems) if problems else "no encoder tensor found")
            + "."
            + hint
        )

    built = legacy_merging_of(model)
    if recorded is not None and built is not None and built != recorded:
        text = f"{path} was trained with patch merging in {_order(recorded)} ({why}); the network merges in {_order(built)}"
        if not accept_mismatch:
            raise PretrainedWeightsError(
                f"{text}. Build it with legacy_merging={recorded} (the bundles: --legacy_merging None follows the file)."
            )
        logger.warning(f"{text}; loading anyway (accept_mismatch)")
    report.merging = _order(built) + (f", as the file ({why})" if built == recorded else "")
    _, updated, _ = copy_model_state(model, mapped, inplace=True)
    report.matched = sorted(updated)
    if report.missing or report.shape_mismatch:
        logger.warning(
            "%s; NOT loaded: %d missing, %d mis-shaped",
            report.summary(),
            len(report.missing),
            len(report.shape_mismatch),
        )
    else:
        logger.info(report.summary())
    return report


def prepare_network(
    network: torch.nn.Module,
    device: torch.device | str,
    pretrained_path: str | None = None,
    bundle_root: str = ".",
    accept_mismatch: bool = False,
) -> torch.nn.Module:
    """The training network: ``network`` with encoder weights from ``pretrained_path`` (if given), on ``device``.

    Used by the bundles' ``network`` id so that ``--pretrained_path None`` trains from scratch and a
    path loads (strictly, loudly, into the merging order it was trained with) before anything else is
    built on the weights. ``accept_mismatch`` is passed to :func:`load_swinvit_weights`.
    """
    path = validate_optional_path(pretrained_path, "pretrained_path")
    if path is not None:
        verified_path(path, bundle_root)
        load_swinvit_weights(network, path, strict=True, accept_mismatch=accept_mismatch)
    return network.to(device)
