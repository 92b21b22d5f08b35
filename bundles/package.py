"""Bundle archives, an index of them, and downloads through it.

    python -m bundles package swin_unetr_btcv [--out dist/] [--include models/model.pt]
    python -m bundles index dist/*.zip --base_url https://models.example.org/bundles [--out dist/model_info.json]
    python -m bundles download swin_unetr_btcv --index <file or URL of model_info.json> --bundle_dir ./bundles [--version 0.1.0]

``package`` writes ``<name>_v<version>.zip`` holding the bundle folder with a real copy of ``custom/``
(the link is followed), no caches or run outputs, and only the files under ``models/`` named with
``--include``. From outside the bundle it adds only the repository's documents that the bundle's
``docs/README.md`` links (``SHARED_DOCS``: the operations guide), as ``docs/operations.md`` beside the
README, whose links to them are pointed at those copies, so they work in the unpacked archive too. It
is byte-for-byte reproducible: entries sorted, fixed timestamps and permissions, fixed compression
level. Its sha256 is printed.

``index`` writes the model zoo's ``model_info.json`` layout, keyed ``<name>_v<version>``, each with
``source`` (the archive's URL) and ``checksum`` (sha256), so a team can serve bundles from a URL it
controls. ``download`` reads such an index, fetches the archive with MONAI's ``download_url``, which
refuses a checksum mismatch, and unpacks it with MONAI's ``extractall``. MONAI's own
``python -m monai.bundle download --name <name> --url <archive URL>`` also works on these archives
(it does not check the checksum).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import posixpath
import sys
import urllib.request
import zipfile
from pathlib import Path

__all__ = ["package_bundle", "packaged_readme", "write_index", "download_bundle", "main"]

REPO = Path(__file__).resolve().parents[1]
#: never packaged: caches, editor files, run outputs (models/ only with --include)
EXCLUDED_PARTS = {"__pycache__", ".pytest_cache", "outputs", "eval", ".ipynb_checkpoints"}
FIXED_TIME = (1980, 1, 1, 0, 0, 0)
#: repository documents each archive carries, linked from the bundle README as ``../../<path>``:
#: path in the repository -> path in the bundle
SHARED_DOCS = {"docs/operations.md": "docs/operations.md"}
BUNDLE_README = "docs/README.md"


def _files(bundle: Path, include: list[str]) -> list[tuple[str, Path]]:
    """(archive name relative to the bundle, file) pairs, links followed, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(bundle, followlinks=True):
        rel_dir = Path(dirpath).relative_to(bundle)
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_PARTS and not d.startswith("."))
        for name in filenames:
            rel = (rel_dir / name).as_posix()
            if name.endswith((".pyc", ".pyo")) or name.startswith("."):
                continue
            if rel.startswith("models/") and rel not in include:
                continue
            found.append((rel, Path(dirpath) / name))
    missing = [i for i in include if not (bundle / i).is_file()]
    if missing:
        raise FileNotFoundError(f"--include: no such file in {bundle}: {missing}")
    return sorted(found)


def _shared_docs(bundle: Path, packaged: set[str]) -> list[tuple[str, Path]]:
    """(archive name, file) of each ``SHARED_DOCS`` entry the bundle does not hold itself.

    Raises:
        FileNotFoundError: the repository lacks one of them (the README's links would lead nowhere).
    """
    extra = []
    for repo_path, rel in SHARED_DOCS.items():
        if rel in packaged:  # an unpacked archive packaged again already holds its copy
            continue
        source = REPO / repo_path
        if not source.is_file():
            raise FileNotFoundError(
                f"{source}: not found; {bundle.name}/{BUNDLE_README} links it and every archive carries it"
            )
        extra.append((rel, source))
    return extra


def packaged_readme(text: str) -> str:
    """The bundle README as archived: links to a ``SHARED_DOCS`` document point at its copy in the bundle.

    Example:
        >>> packaged_readme("[guide](../../docs/operations.md#many-nodes)")
        '[guide](operations.md#many-nodes)'
    """
    for repo_path, rel in SHARED_DOCS.items():
        target = posixpath.relpath(rel, posixpath.dirname(BUNDLE_README))
        text = text.replace(f"](../../{repo_path})", f"]({target})").replace(f"](../../{repo_path}#", f"]({target}#")
    return text


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def package_bundle(
    bundle_dir: str | os.PathLike, out_dir: str | os.PathLike = "dist", include: list[str] | None = None
) -> Path:
    """Write the reproducible archive of ``bundle_dir`` into ``out_dir``; returns its path.

    The archive holds the bundle (``custom/`` followed), the ``SHARED_DOCS`` its README links, and the
    README with those links pointed at the copies (:func:`packaged_readme`).

    Raises:
        FileNotFoundError: no ``configs/metadata.json``, an ``include`` file is missing, or the repository
            lacks a ``SHARED_DOCS`` document.
        ValueError: ``custom/`` is missing or the bundle's metadata has no version.
    """
    bundle = Path(bundle_dir).resolve()
    meta_file = bundle / "configs" / "metadata.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file}: not found: is {bundle} a bundle?")
    version = json.loads(meta_file.read_text(encoding="utf-8")).get("version")
    if not version:
        raise ValueError(f"{meta_file}: no version")
    if not (bundle / "custom").is_dir():
        raise ValueError(f"{bundle}: no custom/ folder (or a broken link): the configs reference it")
    name = bundle.name
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    archive = out / f"{name}_v{version}.zip"
    tmp = archive.with_suffix(".zip.tmp")
    files = _files(bundle, include or [])
    files = sorted(files + _shared_docs(bundle, {rel for rel, _ in files}))
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for rel, path in files:
            info = zipfile.ZipInfo(f"{name}/{rel}", date_time=FIXED_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            data = path.read_bytes()
            if rel == BUNDLE_README:
                data = packaged_readme(data.decode("utf-8")).encode("utf-8")
            zf.writestr(info, data, compresslevel=9)
    os.replace(tmp, archive)
    return archive


def write_index(archives: list[str | os.PathLike], base_url: str, out: str | os.PathLike) -> dict:
    """Write (or extend) ``out`` in the model zoo's model_info.json layout; returns the whole index."""
    path = Path(out)
    index = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    for archive in map(Path, archives):
        key = archive.stem  # <name>_v<version>
        index[key] = {
            "checksum": sha256(archive),
            "hash_type": "sha256",
            "source": f"{base_url.rstrip('/')}/{archive.name}",
        }
    path.write_text(json.dumps(dict(sorted(index.items())), indent=4) + "\n", encoding="utf-8")
    return index


def _read_index(index: str) -> dict:
    url = index if "://" in index else Path(index).resolve().as_uri()
    with urllib.request.urlopen(url, timeout=60) as r:  # noqa: S310 (file:// or the team's own http(s) URL)
        return json.loads(r.read().decode())


def download_bundle(name: str, index: str, bundle_dir: str | os.PathLike, version: str | None = None) -> Path:
    """Download ``name`` (latest version in the index, or ``version``) into ``bundle_dir``; returns the bundle folder.

    Raises:
        KeyError: the index has no such bundle or version.
        ValueError: the archive's checksum differs from the index (checked by MONAI's ``download_url``).
    """
    from monai.apps.utils import HashCheckError, download_url, extractall

    entries = _read_index(index)
    versions = sorted(
        (k.rsplit("_v", 1)[1] for k in entries if k.rsplit("_v", 1)[0] == name),
        key=lambda v: [int(x) for x in v.split(".") if x.isdigit()],
    )
    if not versions or (version is not None and version not in versions):
        raise KeyError(
            f"{index}: no bundle {name!r}"
            + (f" version {version}" if version else "")
            + f"; it lists {sorted(entries)}"
        )
    entry = entries[f"{name}_v{version or versions[-1]}"]
    target = Path(bundle_dir)
    target.mkdir(parents=True, exist_ok=True)
    archive = target / Path(entry["source"]).name
    try:
        download_url(
            entry["source"], str(archive), hash_val=entry["checksum"], hash_type=entry.get("hash_type", "sha256")
        )
    except HashCheckError as e:
        archive.unlink(missing_ok=True)
        raise ValueError(
            f"{entry['source']}: checksum differs from the index {index}: refused, nothing unpacked"
        ) from e
    extractall(str(archive), str(target), has_base=True)
    archive.unlink()
    return target / name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bundles", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("package", help="write <name>_v<version>.zip")
    p.add_argument("bundle")
    p.add_argument("--out", default="dist")
    p.add_argument(
        "--include", nargs="*", default=[], help="files under models/ to pack (weights are not packed by default)"
    )
    p = sub.add_parser("index", help="write model_info.json for archives served from --base_url")
    p.add_argument("archives", nargs="+")
    p.add_argument("--base_url", required=True)
    p.add_argument("--out", default="dist/model_info.json")
    p = sub.add_parser("download", help="download a bundle through an index")
    p.add_argument("name")
    p.add_argument("--index", required=True)
    p.add_argument("--bundle_dir", required=True)
    p.add_argument("--version", default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "package":
            archive = package_bundle(
                REPO / args.bundle if not Path(args.bundle).is_dir() else args.bundle, args.out, args.include
            )
            print(f"{archive}  sha256 {sha256(archive)}")
        elif args.command == "index":
            write_index(args.archives, args.base_url, args.out)
            print(f"wrote {args.out}")
        else:
            print(f"downloaded {download_bundle(args.name, args.index, args.bundle_dir, args.version)}")
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
