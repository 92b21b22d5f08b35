"""The MONAI model zoo's checks of a bundle, run offline on this collection's bundles.

    python -m ci.zoo_checks                                   # the three bundles, every check, and lint
    python -m ci.zoo_checks swin_unetr_btcv swin_unetr_ssl    # named bundles (or paths to bundle folders)
    python -m ci.zoo_checks swin_unetr_msd --checks files,metadata,json_format   # the quick ones (no model)
    python -m ci.zoo_checks --checks lint                     # only the repository's lint

(from the repository root: ``ci``, ``bundles`` and ``custom`` import as packages).

Prints one PASS/FAIL line per check (the reasons under a failure) and exits with status 1 when any
check failed. What the model zoo's CI does to a bundle (Project-MONAI/model-zoo ``ci/verify_bundle.py``,
its pre-merge scripts and ``setup.cfg``), and what each check here does:

``files``
    ``configs/metadata.json``, ``configs/inference.json``, ``LICENSE`` and ``docs/README.md`` exist. The
    zoo fetches a bundle's weights through ``large_files.yml`` (``large_files:`` entries of ``path``,
    ``url``, ``hash_val``, ``hash_type``); ``custom.networks.weights.verified_path`` checks files listed there
    before loading them, by sha256 here. So a bundle's listing is checked the way that code reads it:
    the file is named ``large_files.yml``, each entry has a ``path`` under ``models/``, a ``url``,
    ``hash_type`` sha256 and a 64-hex ``hash_val``, and a listed file that is present has that
    checksum. The bundles ship no weights, so none has a listing yet.
``metadata``
    ``configs/metadata.json`` is valid against ``ci/metadata_schema.json`` (the zoo downloads its own
    schema; this one is written from what the zoo requires), its version is in the changelog, the
    pinned monai/pytorch/numpy versions are not newer than the installed ones (and the pinned packages
    are installed, not older), ``channel_def`` names every channel; with ``--index`` (a model_info.json)
    the version must not be published yet, as the zoo requires of a changed bundle.
``json_format``
    every JSON file of the bundle reads back as ``json.dumps(data, indent=4)`` plus a newline: the
    zoo's 4-space indent with the key order kept.
``net_in_out``
    MONAI's ``verify_net_in_out`` on ``network_def`` of ``configs/inference.json``: a random input of
    the metadata's shape and dtype, output channels and dtype as the metadata says.
``properties``
    MONAI's property check (``ConfigWorkflow(...).check_properties()``) of the train workflow
    (``configs/train.json``) and of the infer workflow (``configs/inference.json``) is empty. It builds
    the configs' objects, so it runs on data made from the shared CT sample (see below).
``torchscript``
    ``monai.bundle.ckpt_export`` traces ``network_def`` (``use_trace``; ``torch.jit.script`` does not
    work on Swin UNETR) at a fixed input shape, with the metadata and config saved in the file; the
    loaded module must reproduce the eager network on another random input (max abs difference
    reported, at most 1e-4). The bundles ship no weights: a freshly initialised network is exported
    unless ``check_torchscript`` is given a checkpoint.
``lint`` (once, for the repository)
    black and isort at line length 120 (``pyproject.toml``) and flake8 with the zoo's selection
    (``setup.cfg``) over bench/ bundles/ ci/ custom/ tests/; findings are listed by file.

Offline: nothing is downloaded. The checks that build objects from the configs need data: the shared
CT sample (``--sample_dir``, default ``../shared/data/ct_sample``) becomes, in a temporary folder, a
BTCV dataset, an SSL corpus and an MSD Spleen task. Networks are built with ``--feature_size 12``
(default; ``--feature_size 48`` is the bundles' own size) so that all of it runs in a few minutes on a
CPU; the traced export uses the metadata's input shape unless ``--export_shape`` says otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

__all__ = [
    "BUNDLES",
    "BUNDLE_CHECKS",
    "CheckResult",
    "ZooCheckError",
    "bundle_overrides",
    "check_files",
    "check_json_format",
    "check_lint",
    "check_metadata",
    "check_net_in_out",
    "check_properties",
    "check_torchscript",
    "json_format_problem",
    "large_files_problems",
    "lint_findings",
    "main",
    "run_checks",
]

BUNDLES = ("swin_unetr_btcv", "swin_unetr_ssl", "swin_unetr_msd")
SCHEMA = REPO / "ci" / "metadata_schema.json"
META = "configs/metadata.json"
INFERENCE = "configs/inference.json"
TRAIN = "configs/train.json"
NET_ID = "network_def"
REQUIRED_FILES = (META, INFERENCE, "LICENSE", "docs/README.md")
#: the names the zoo accepts for the large-file listing; ``custom.networks.weights.verified_path`` reads the first
LARGE_FILES = ("large_files.yml", "large_files.yaml", "large_files.json")
#: per-bundle checks, cheap first, in the order they run
BUNDLE_CHECKS = ("files", "metadata", "json_format", "net_in_out", "properties", "torchscript")
REPO_CHECKS = ("lint",)
LINT_PATHS = ("bench", "bundles", "ci", "custom", "tests")
#: largest difference allowed between the traced module and the eager network (float rounding only)
TORCHSCRIPT_ATOL = 1e-4
#: metadata version field -> installed distribution
PINNED = {"monai_version": "monai", "pytorch_version": "torch", "numpy_version": "numpy"}


class ZooCheckError(Exception):
    """A check failed; ``problems`` lists every reason, each naming its file or field."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


@dataclass
class CheckResult:
    """One check of one bundle (``target`` is the bundle's name, or ``repository`` for lint)."""

    target: str
    check: str
    ok: bool
    details: str
    seconds: float

    def report(self) -> str:
        lines = self.details.splitlines() or [""]
        head = f"{'PASS' if self.ok else 'FAIL'}  {self.target:<16} {self.check:<12} {self.seconds:6.1f} s"
        if self.ok:
            return f"{head}  {lines[0]}"
        return "\n".join([head] + [f"      {line}" for line in lines])


def _fail_if(problems: Sequence[str]) -> None:
    if problems:
        raise ZooCheckError(problems)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ZooCheckError([f"{path}: not found"]) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ZooCheckError([f"{path}: not valid JSON ({e})"]) from None


# -- files ----------------------------------------------------------------------------------------
def large_files_problems(bundle: str | os.PathLike) -> list[str]:
    """What is wrong with the bundle's large-file listing (empty: fine, or no listing)."""
    from bundles.package import sha256
    from custom.networks.weights import read_large_files

    root = Path(bundle)
    present = [n for n in LARGE_FILES if (root / n).is_file()]
    problems = [
        f"{n}: custom.networks.weights.verified_path reads only large_files.yml: rename it, or its files are never checked"
        for n in present
        if n != "large_files.yml"
    ]
    try:
        entries = read_large_files(root)
    except ValueError as e:
        return problems + [str(e)]
    if entries is None:
        return problems
    if not entries:
        return problems + [
            "large_files.yml: expected a non-empty `large_files:` list of {path, url, hash_val, hash_type}"
        ]
    for i, entry in enumerate(entries):
        where = f"large_files.yml: large_files[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected a mapping of path, url, hash_val, hash_type, got {entry!r}")
            continue
        path = entry.get("path")
        if not isinstance(path, str) or not path:
            problems.append(f"{where}: path missing")
        else:
            norm = os.path.normpath(path)
            where = f"large_files.yml: {path}"
            if os.path.isabs(path) or not norm.startswith("models" + os.sep) or ".." in Path(norm).parts:
                problems.append(f"{where}: path must lie under models/ (relative to the bundle root)")
        url = entry.get("url")
        if not isinstance(url, str) or not re.match(r"^(https?|ftp)://\S+$", url):
            problems.append(f"{where}: url missing or not an http(s) URL, got {url!r}")
        if entry.get("hash_type") != "sha256":
            problems.append(f"{where}: hash_type must be sha256, got {entry.get('hash_type')!r}")
        hash_val = entry.get("hash_val")
        if not isinstance(hash_val, str) or not re.fullmatch(r"[0-9a-f]{64}", hash_val):
            problems.append(f"{where}: hash_val must be 64 lower-case hex digits (a sha256), got {hash_val!r}")
        elif isinstance(path, str) and (root / path).is_file() and sha256(root / path) != hash_val:
            problems.append(f"{where}: the file present has sha256 {sha256(root / path)}, the listing says {hash_val}")
    return problems


def check_files(bundle: str | os.PathLike) -> str:
    """The files the zoo requires, and the large-file listing (see the module docstring)."""
    root = Path(bundle)
    problems = [f"{f}: missing" for f in REQUIRED_FILES if not (root / f).is_file()]
    problems += large_files_problems(root)
    _fail_if(problems)
    from custom.networks.weights import read_large_files

    entries = read_large_files(root)
    if entries is not None:
        weights = f"large_files.yml lists {len(entries)} file(s) under models/, sha256 checked where present"
    else:
        weights = "no large_files.yml (no weights shipped)"
    return f"{', '.join(REQUIRED_FILES)} present; {weights}"


# -- metadata -------------------------------------------------------------------------------------
def _describe(error: Any) -> str:
    """One line per schema error, starting with the dotted name of the field."""
    path = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "required":
        missing = re.match(r"^'([^']+)'", error.message)
        name = missing.group(1) if missing else error.message
        return f"{path + '.' if path else ''}{name}: missing"
    if error.validator == "oneOf" and not path:
        return (
            "required_packages_version: missing, or given together with optional_packages_version "
            "(MONAI 1.6's name; the older optional_packages_version is accepted instead, not both)"
        )
    return f"{path or '(top level)'}: {error.message}"


def _installed(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def check_metadata(
    bundle: str | os.PathLike, schema_file: str | os.PathLike = SCHEMA, index: str | os.PathLike | None = None
) -> str:
    """Schema and the cross-field rules of the module docstring; every problem names its field.

    Raises:
        ZooCheckError: the problems, e.g. ``task: missing``, ``version: '1.0' does not match ...``.
    """
    from jsonschema import Draft202012Validator
    from packaging.version import InvalidVersion, Version

    root = Path(bundle)
    meta = _read_json(root / META)
    schema = _read_json(Path(schema_file))
    validator = Draft202012Validator(schema)
    problems = [_describe(e) for e in sorted(validator.iter_errors(meta), key=lambda e: [str(p) for p in e.path])]
    if not isinstance(meta, dict):
        raise ZooCheckError(problems or [f"{META}: expected a JSON object"])

    version = meta.get("version")
    changelog = meta.get("changelog")
    if isinstance(version, str) and isinstance(changelog, dict) and version not in changelog:
        problems.append(f"changelog: no entry for the version {version}")
    pins = []
    packages = meta.get("required_packages_version") or meta.get("optional_packages_version") or {}
    fields = [(k, PINNED[k], meta.get(k)) for k in PINNED]
    if isinstance(packages, dict):
        key = "required_packages_version" if "required_packages_version" in meta else "optional_packages_version"
        fields += [(f"{key}.{name}", name, v) for name, v in packages.items()]
    for field_name, dist, wanted in fields:
        if not isinstance(wanted, str):
            continue  # reported by the schema
        have = _installed(dist)
        if have is None:
            problems.append(f"{field_name}: {dist} {wanted} is pinned but not installed")
            continue
        try:
            newer = Version(wanted) > Version(Version(have).base_version)  # 2.13.0+cpu -> 2.13.0
        except InvalidVersion as e:
            problems.append(f"{field_name}: {e}")
            continue
        if newer:
            problems.append(f"{field_name}: {wanted} is newer than the installed {dist} {have}")
        elif field_name in PINNED:
            pins.append(f"{dist} {wanted} <= {have}")

    tensors = meta.get("network_data_format", {})
    for side in ("inputs", "outputs"):
        items = tensors.get(side, {}) if isinstance(tensors, dict) else {}
        for name, spec in (items.items() if isinstance(items, dict) else []):
            if not isinstance(spec, dict):
                continue
            n, channels = spec.get("num_channels"), spec.get("channel_def")
            if isinstance(n, int) and isinstance(channels, dict) and sorted(channels) != sorted(map(str, range(n))):
                problems.append(
                    f"network_data_format.{side}.{name}.channel_def: names channels {sorted(channels, key=str)}, "
                    f"num_channels is {n} (expected 0..{n - 1})"
                )

    if index is not None and isinstance(version, str):
        published = _read_json(Path(index))
        key = f"{root.name}_v{version}"
        if key in published:
            problems.append(
                f"version: {version} is already published in {index} ({key}): a changed bundle needs a new one"
            )
    _fail_if(problems)
    return f"valid against ci/{Path(schema_file).name}; version {version} in changelog; " + ", ".join(pins)


# -- JSON formatting ------------------------------------------------------------------------------
def json_format_problem(path: str | os.PathLike) -> str | None:
    """None when ``path`` reads ``json.dumps(data, indent=4) + "\\n"``, else where it first differs."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    try:
        expected = json.dumps(json.loads(text), indent=4) + "\n"
    except json.JSONDecodeError as e:
        return f"{p.name}: not valid JSON ({e})"
    if text == expected:
        return None
    got_lines, want_lines = text.splitlines(), expected.splitlines()
    for i, (got, want) in enumerate(zip(got_lines, want_lines, strict=False), 1):
        if got != want:
            return f"{p.name}: line {i} reads {got!r}, the zoo's format is {want!r} (4-space indent, key order kept)"
    return f"{p.name}: differs from json.dumps(data, indent=4) at the end of the file (one final newline)"


def check_json_format(bundle: str | os.PathLike) -> str:
    root = Path(bundle)
    files = sorted(root.glob("configs/*.json")) + [p for p in (root / "large_files.json",) if p.is_file()]
    problems = [f"{f.parent.name}/{msg}" for f in files if (msg := json_format_problem(f))]
    _fail_if(problems)
    return f"{len(files)} JSON files in the zoo's format (4-space indent, key order kept)"


# -- configs: inputs, and the checks that build objects -------------------------------------------
@contextlib.contextmanager
def _bundle_on_path(bundle: Path) -> Iterator[None]:
    """The bundle root on ``sys.path`` (its ``custom`` package), as the zoo runs bundles."""
    entry = str(bundle)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Only errors from logger ``name`` for a while."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _sample_dataset(work: Path, sample_dir: Path) -> Path:
    from bundles.sample_data import prepare_sample_dataset

    folder = work / "btcv_sample"
    prepare_sample_dataset(folder, sample_dir)
    return folder


def _btcv_inputs(bundle: Path, work: Path, sample_dir: Path) -> dict:
    data = _sample_dataset(work, sample_dir)
    return {"dataset_dir": str(data), "input_dir": str(data / "imagesTs")}


def _ssl_inputs(bundle: Path, work: Path, sample_dir: Path) -> dict:
    """The sample as an SSL corpus, preprocessed by the bundle's own ``prepare_corpus`` (the train
    workflow's dataset reads the corpus index when it is built)."""
    from monai.bundle import ConfigParser

    data = _sample_dataset(work, sample_dir)
    inputs = {
        "dataset_dir": str(data),
        "datalist": [str(data / "ssl_dataset.json")],
        "cache_dir": str(work / "ssl_corpus"),
        "input_dir": str(data / "imagesTs"),
        "batch_size": 1,  # the sample's corpus has one training volume; full batches only (global negatives)
    }
    with _bundle_on_path(bundle):
        parser = ConfigParser()
        parser.read_config(str(bundle / TRAIN))
        for k, v in inputs.items():
            parser[k] = v
        parser.get_parsed_content("prepare_corpus")()
    return inputs


def _msd_inputs(bundle: Path, work: Path, sample_dir: Path) -> dict:
    """An MSD ``Task09_Spleen`` folder (the metadata's default task) made by the tests' own builder
    (``bundles.msd_tasks.make_task``): two labelled cases (the five-fold split needs a training and a
    validation case) and one test image."""
    from bundles.msd_tasks import make_task

    return {"dataset_dir": str(make_task(work, "Task09_Spleen", cases=2, tests=1))}


#: bundle name -> maker of its inputs (ids of its configs -> values), with the builders the tests use: the CT
#: sample as a BTCV dataset folder (``bundles.sample_data``), a small MSD task (``bundles.msd_tasks``)
INPUT_MAKERS: dict[str, Callable[[Path, Path, Path], dict]] = {
    "swin_unetr_btcv": _btcv_inputs,
    "swin_unetr_ssl": _ssl_inputs,
    "swin_unetr_msd": _msd_inputs,
}


def bundle_overrides(
    bundle: str | os.PathLike, work_dir: str | os.PathLike, sample_dir: str | os.PathLike, feature_size: int | None = 12
) -> dict:
    """Config overrides for the checks that build the bundle's objects: data made from the CT sample,
    outputs under ``work_dir``, no caching or loader processes, and ``feature_size`` (None: the bundle's)."""
    root, work = Path(bundle).resolve(), Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    maker = INPUT_MAKERS.get(root.name)
    if maker is None:
        raise ZooCheckError([f"{root.name}: no input maker in ci/zoo_checks.py INPUT_MAKERS (bundles: {BUNDLES})"])
    overrides = maker(root, work, Path(sample_dir))
    overrides.update(
        {"ckpt_dir": str(work / "models"), "output_dir": str(work / "outputs"), "num_workers": 0, "cache_rate": 0.0}
    )
    if feature_size is not None:
        overrides["feature_size"] = feature_size
    return overrides


def _image_spec(root: Path) -> tuple[dict, dict]:
    meta = _read_json(root / META)
    fmt = meta["network_data_format"]
    return fmt["inputs"]["image"], fmt["outputs"]["pred"]


def check_net_in_out(bundle: str | os.PathLike, overrides: dict | None = None, device: str | None = None) -> str:
    """MONAI's ``verify_net_in_out`` (the zoo's call) on ``network_def`` of ``configs/inference.json``.

    Raises:
        ZooCheckError: the output's channels or dtype differ from the metadata, or the network fails.
    """
    import torch
    from monai.bundle import verify_net_in_out

    root = Path(bundle).resolve()
    image, pred = _image_spec(root)
    try:
        with _bundle_on_path(root), torch.random.fork_rng(devices=[]):  # its random input: no global side effect
            verify_net_in_out(
                net_id=NET_ID,
                meta_file=str(root / META),
                config_file=str(root / INFERENCE),
                device=device or "cpu",
                bundle_root=str(root),
                **(overrides or {}),
            )
    except (ValueError, KeyError, RuntimeError) as e:
        raise ZooCheckError([f"{NET_ID} of {INFERENCE}: {e}"]) from e
    shape = [1, image["num_channels"], *image["spatial_shape"]]
    return (
        f"{NET_ID} of {INFERENCE} on a random {shape} {image['dtype']} input gives {pred['num_channels']} "
        f"{pred['dtype']} channel(s), as the metadata says"
    )


def check_properties(
    bundle: str | os.PathLike,
    overrides: dict | None = None,
    workflows: Sequence[tuple[str, Sequence[str]]] = (("train", (TRAIN,)), ("infer", (INFERENCE,))),
) -> str:
    """``ConfigWorkflow(workflow_type=...).check_properties()`` is empty for each workflow.

    Raises:
        ZooCheckError: a required property is absent or cannot be built (MONAI's check raises for those:
            the error is reported), or an optional one is referenced under a wrong id (MONAI lists those).
    """
    from monai.bundle import ConfigWorkflow

    root = Path(bundle).resolve()
    problems, done = [], []
    for workflow_type, configs in workflows:
        missing_files = [c for c in configs if not (root / c).is_file()]
        if missing_files:
            problems.append(f"{workflow_type} workflow: {', '.join(missing_files)} missing")
            continue
        with _bundle_on_path(root), _quiet("monai.bundle.workflows"):  # "Logging file is set to False"
            wf = ConfigWorkflow(
                config_file=[str(root / c) for c in configs],
                meta_file=str(root / META),
                logging_file=False,
                workflow_type=workflow_type,
                bundle_root=str(root),
                **(overrides or {}),
            )
        with _bundle_on_path(root):
            wf.initialize()
            try:
                missing = wf.check_properties()
            except Exception as e:  # MONAI raises (not lists) a required id that is absent or fails to build
                problems.append(f"{workflow_type} workflow ({', '.join(configs)}): {_explain(e)}")
                continue
        if missing:
            problems.append(
                f"{workflow_type} workflow ({', '.join(configs)}): missing or misnamed properties {missing}"
            )
        else:
            done.append(f"{workflow_type} ({', '.join(Path(c).name for c in configs)})")
    _fail_if(problems)
    return f"no missing property: {', '.join(done)}"


def check_torchscript(
    bundle: str | os.PathLike,
    overrides: dict | None = None,
    work_dir: str | os.PathLike | None = None,
    ckpt_file: str | os.PathLike | None = None,
    spatial_shape: Sequence[int] | None = None,
    atol: float = TORCHSCRIPT_ATOL,
    seed: int = 0,
) -> str:
    """Trace ``network_def`` with ``monai.bundle.ckpt_export`` and compare the loaded module with eager.

    Args:
        ckpt_file: a state_dict (or ``{"model": state_dict}``) for ``network_def``; None exports a freshly
            initialised network (seeded).
        spatial_shape: the traced input's spatial size (fixed in the export); None: the metadata's.
        atol: largest allowed max abs difference between the two outputs.

    ``torch.jit.trace``'s own check (``check_trace``) is turned off: it would run the network twice
    more on the trace's input; the comparison here uses another input and the loaded file.

    Raises:
        ZooCheckError: the export fails, the file lacks the metadata, or the outputs differ.
    """
    import torch
    from monai.bundle import ConfigParser, ckpt_export
    from monai.utils import get_equivalent_dtype

    root = Path(bundle).resolve()
    image, _ = _image_spec(root)
    spatial = list(spatial_shape or image["spatial_shape"])
    if not all(isinstance(s, int) for s in spatial):
        raise ZooCheckError([f"the metadata's spatial_shape {spatial} is not fixed: give the export's spatial_shape"])
    shape = [1, image["num_channels"], *spatial]
    dtype = get_equivalent_dtype(image["dtype"], torch.Tensor)
    overrides = dict(overrides or {})
    with contextlib.ExitStack() as stack:
        work = Path(work_dir) if work_dir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        stack.enter_context(_bundle_on_path(root))
        stack.enter_context(torch.random.fork_rng(devices=[]))  # seeds below stay local to this check
        parser = ConfigParser()
        parser.read_config(str(root / INFERENCE))
        for k, v in {"bundle_root": str(root), **overrides}.items():
            parser[k] = v
        torch.manual_seed(seed)
        net = parser.get_parsed_content(NET_ID)
        if ckpt_file is None:
            ckpt_file = work / "model.pt"
            torch.save(net.state_dict(), ckpt_file)
        else:
            state = torch.load(ckpt_file, map_location="cpu", weights_only=True)
            net.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
        ts_file = work / "model.ts"
        # the trace turns the networks' input-size checks into constants: the export's shape is fixed (documented)
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        try:
            ckpt_export(
                net_id=NET_ID,
                filepath=str(ts_file),
                ckpt_file=str(ckpt_file),
                meta_file=str(root / META),
                config_file=str(root / INFERENCE),
                bundle_root=str(root),
                use_trace=True,
                input_shape=shape,
                converter_kwargs={"check_trace": False},
                **overrides,
            )
        except Exception as e:
            raise ZooCheckError([f"ckpt_export --use_trace True --input_shape {shape}: {type(e).__name__}: {e}"]) from e
        extra = {"metadata.json": "", "inference.json": ""}
        traced = torch.jit.load(str(ts_file), map_location="cpu", _extra_files=extra)
        problems = [f"{ts_file.name}: {name} not saved in the file" for name, text in extra.items() if not text]
        x = torch.rand(shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
        with torch.no_grad():
            eager = net.eval()(x)
            got = traced(x)
        if got.shape != eager.shape:
            problems.append(f"traced output shape {tuple(got.shape)}, eager {tuple(eager.shape)}")
            diff = float("nan")
        else:
            diff = (got.float() - eager.float()).abs().max().item()
            if not diff <= atol:
                problems.append(f"traced module differs from eager: max abs difference {diff:.2e} > {atol:g}")
    _fail_if(problems)
    return (
        f"traced at {shape} {image['dtype']}, metadata and config saved in the file; loaded module vs eager "
        f"on another input: max abs difference {diff:.1e} (limit {atol:g})"
    )


# -- lint -----------------------------------------------------------------------------------------
def _tool(args: list[str], root: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", *args], cwd=root, capture_output=True, encoding="utf-8", errors="replace", timeout=600
    )
    if "No module named" in proc.stderr:
        raise ZooCheckError([f"{args[0]} is not installed: pip install -r requirements-dev.txt"])
    return proc


def _rel(path: str, root: Path) -> str:
    """A tool's file name (absolute, or relative to ``root`` where the tool ran) relative to ``root``."""
    p = Path(path)
    return Path(os.path.relpath(p if p.is_absolute() else root / p, root)).as_posix()


def lint_findings(paths: Sequence[str] = LINT_PATHS, root: str | os.PathLike = REPO) -> dict[str, list[str]]:
    """``{file (relative to root): [finding, ...]}`` from black, isort and flake8 with the repository's settings."""
    root = Path(root)
    targets = [p for p in paths if (root / p).exists()]
    found: dict[str, list[str]] = {}
    if not targets:
        return found
    black = _tool(["black", "--check", *targets], root)
    for line in black.stderr.splitlines():
        if line.startswith("would reformat "):
            found.setdefault(_rel(line[len("would reformat ") :].strip(), root), []).append("black: would reformat")
        elif line.startswith("error: "):
            found.setdefault(line.split(": ")[2] if line.count(": ") > 1 else line, []).append(f"black: {line}")
    isort = _tool(["isort", "--check-only", *targets], root)
    for line in (isort.stdout + isort.stderr).splitlines():
        m = re.match(r"^ERROR: (\S+) Imports are incorrectly sorted", line)
        if m:
            found.setdefault(_rel(m.group(1), root), []).append("isort: imports not sorted")
    flake8 = _tool(["flake8", *targets], root)
    for line in flake8.stdout.splitlines():
        m = re.match(r"^(.+?):(\d+):(\d+): (\w+) (.*)$", line)
        if m:
            found.setdefault(_rel(m.group(1), root), []).append(f"flake8 {m.group(4)} line {m.group(2)}: {m.group(5)}")
    if flake8.returncode not in (0, 1) or (flake8.returncode == 1 and not flake8.stdout.strip()):
        found.setdefault("(flake8)", []).append(f"exit {flake8.returncode}: {flake8.stderr.strip()[-500:]}")
    return dict(sorted(found.items()))


def check_lint(paths: Sequence[str] = LINT_PATHS, root: str | os.PathLike = REPO) -> str:
    found = lint_findings(paths, root)
    _fail_if([f"{f}: {'; '.join(items)}" for f, items in found.items()])
    return f"black, isort and flake8 clean over {', '.join(p + '/' for p in paths)}"


# -- running --------------------------------------------------------------------------------------
def _bundle_path(name: str) -> Path:
    p = Path(name)
    if p.is_dir():
        return p.resolve()
    if (REPO / name).is_dir():
        return REPO / name
    raise FileNotFoundError(f"{name}: no such bundle (a folder, or one of {', '.join(BUNDLES)})")


def _explain(error: BaseException) -> str:
    """The exception and its causes (MONAI wraps a component's own error in a RuntimeError), one per line."""
    lines, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        lines.append(f"{'' if not lines else 'caused by '}{type(error).__name__}: {str(error).strip()}")
        error = error.__cause__ or error.__context__
    return "\n".join(lines)


def _timed(target: str, check: str, fn: Callable[[], str]) -> CheckResult:
    start = time.perf_counter()
    try:
        ok, details = True, fn()
    except ZooCheckError as e:
        ok, details = False, "\n".join(e.problems)
    except Exception as e:
        ok, details = False, _explain(e)
    return CheckResult(target, check, ok, details, time.perf_counter() - start)


def run_checks(
    bundles: Sequence[str] = BUNDLES,
    checks: Sequence[str] = BUNDLE_CHECKS + REPO_CHECKS,
    feature_size: int | None = 12,
    sample_dir: str | os.PathLike | None = None,
    work_dir: str | os.PathLike | None = None,
    index: str | os.PathLike | None = None,
    export_shape: Sequence[int] | None = None,
    device: str | None = None,
    on_result: Callable[[CheckResult], None] | None = None,
) -> list[CheckResult]:
    """Run ``checks`` on each bundle (names under the repository, or folders), then the repository's lint."""
    unknown = sorted(set(checks) - set(BUNDLE_CHECKS + REPO_CHECKS))
    if unknown:
        raise ValueError(f"unknown checks {unknown}; choose from {', '.join(BUNDLE_CHECKS + REPO_CHECKS)}")
    if sample_dir is None:
        from bundles.sample_data import DEFAULT_SAMPLE_DIR

        sample_dir = DEFAULT_SAMPLE_DIR
    results: list[CheckResult] = []

    def record(result: CheckResult) -> None:
        results.append(result)
        if on_result is not None:
            on_result(result)

    with contextlib.ExitStack() as stack:
        work = Path(work_dir) if work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="zoo_")))
        for name in bundles:
            root = _bundle_path(name)
            bwork = work / root.name
            inputs: dict = {}

            def needs_inputs(root=root, bwork=bwork, inputs=inputs) -> dict:
                if not inputs:
                    inputs.update(bundle_overrides(root, bwork / "inputs", sample_dir, feature_size))
                return inputs

            steps: dict[str, Callable[[], str]] = {
                "files": lambda root=root: check_files(root),
                "metadata": lambda root=root: check_metadata(root, index=index),
                "json_format": lambda root=root: check_json_format(root),
                # as the zoo's verify_bundle.py calls it: with neither data nor weights (only the check's width)
                "net_in_out": lambda root=root: check_net_in_out(
                    root, {"feature_size": feature_size} if feature_size is not None else {}, device
                ),
                "properties": lambda root=root: check_properties(root, needs_inputs()),
                "torchscript": lambda root=root, bwork=bwork: check_torchscript(
                    root, needs_inputs(), bwork / "export", spatial_shape=export_shape
                ),
            }
            for check in BUNDLE_CHECKS:
                if check in checks:
                    record(_timed(root.name, check, steps[check]))
        if "lint" in checks:
            record(_timed("repository", "lint", check_lint))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ci.zoo_checks",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument(
        "bundles", nargs="*", default=list(BUNDLES), help=f"bundle names or folders (default: {' '.join(BUNDLES)})"
    )
    parser.add_argument(
        "--checks",
        default=",".join(BUNDLE_CHECKS + REPO_CHECKS),
        help="comma-separated, from: " + ", ".join(BUNDLE_CHECKS + REPO_CHECKS) + " (default: all)",
    )
    parser.add_argument(
        "--feature_size", type=int, default=12, help="network width for the model checks (48: the bundles' own)"
    )
    parser.add_argument(
        "--export_shape",
        type=int,
        nargs=3,
        default=None,
        metavar=("X", "Y", "Z"),
        help="traced input's spatial size (default: the metadata's)",
    )
    parser.add_argument("--sample_dir", default=None, help="the shared CT sample (default: ../shared/data/ct_sample)")
    parser.add_argument(
        "--work_dir", default=None, help="keep the prepared data and exports here (default: a temporary folder)"
    )
    parser.add_argument("--index", default=None, help="a model_info.json: the bundle's version must not be in it yet")
    parser.add_argument("--device", default=None, help="device for verify_net_in_out (default: cpu)")
    parser.add_argument("--verbose", action="store_true", help="keep MONAI's and the bundles' INFO logs")
    args = parser.parse_args(argv)
    if not args.verbose:
        logging.disable(logging.INFO)  # MONAI logs every argument of every bundle command it runs
    checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    try:
        results = run_checks(
            args.bundles,
            checks,
            feature_size=args.feature_size,
            sample_dir=args.sample_dir,
            work_dir=args.work_dir,
            index=args.index,
            export_shape=args.export_shape,
            device=args.device,
            on_result=lambda r: print(r.report(), flush=True),
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = [r for r in results if not r.ok]
    print(f"zoo checks: {len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
