"""ci/zoo_checks.py: the three bundles pass the model zoo's checks, and each check rejects what it should."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import BTCV, MSD, REPO, SSL

from bundles.package import sha256
from ci.zoo_checks import (
    BUNDLE_CHECKS,
    BUNDLES,
    LINT_PATHS,
    ZooCheckError,
    bundle_overrides,
    check_files,
    check_json_format,
    check_metadata,
    check_net_in_out,
    check_properties,
    lint_findings,
    run_checks,
)
from custom.networks.weights import verified_path

#: the command line, run from the repository root as the docs say
CLI = [sys.executable, "-m", "ci.zoo_checks"]
OTHER_HASH = "0" * 64


def copy_bundle(src: Path, dst_parent: Path) -> Path:
    """The bundle's own files under ``dst_parent/<name>``, its ``custom`` a link to the repository's."""
    dst = dst_parent / src.name
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("models", "outputs", "eval", "__pycache__"))
    return dst


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data, indent=4) + "\n", encoding="utf-8")


@pytest.mark.parametrize("bundle", BUNDLES)
def test_bundle_passes_every_zoo_check(bundle, sample_dir, tmp_path):
    """Each check on the real bundle, networks at feature_size 12, the traced export at 64^3."""
    results = run_checks(
        [bundle], BUNDLE_CHECKS, feature_size=12, sample_dir=sample_dir, work_dir=tmp_path, export_shape=(64, 64, 64)
    )
    report = "\n".join(r.report() for r in results)
    print(report)
    assert [r.check for r in results] == list(BUNDLE_CHECKS)
    assert all(r.ok for r in results), report
    details = {r.check: r.details for r in results}
    assert "max abs difference" in details["torchscript"] and "[1, 1, 64, 64, 64]" in details["torchscript"]
    assert "no missing property: train (train.json), infer (inference.json)" == details["properties"]
    assert (tmp_path / bundle / "export" / "model.ts").is_file()


@pytest.fixture(scope="module")
def lint() -> dict[str, list[str]]:
    return lint_findings()


@pytest.mark.parametrize("folder", LINT_PATHS)
def test_code_passes_the_zoo_lint(lint, folder):
    """black, isort, flake8 (setup.cfg) per folder, so that one folder's findings name only its files."""
    assert "(flake8)" not in lint, lint["(flake8)"]
    mine = {f: items for f, items in lint.items() if f.startswith(folder + "/")}
    assert not mine, f"lint findings in {folder}/ (python -m ci.zoo_checks --checks lint):\n" + "\n".join(
        f"{f}: {'; '.join(items)}" for f, items in mine.items()
    )


def test_lint_reports_each_tool_by_file(tmp_path):
    for name in ("setup.cfg", "pyproject.toml"):
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "ok.py").write_text('"""Fine."""\n\nimport os\n\nprint(os.sep)\n', encoding="utf-8")
    (tmp_path / "pkg" / "bad.py").write_text("import sys\nimport os\nx=zip([1],[2])\n", encoding="utf-8")
    found = lint_findings(["pkg"], root=tmp_path)
    assert list(found) == ["pkg/bad.py"], found
    text = "; ".join(found["pkg/bad.py"])
    for expected in ("black: would reformat", "isort: imports not sorted", "F401", "B905"):
        assert expected in text


def test_broken_metadata_is_rejected_naming_each_field(tmp_path):
    bundle = copy_bundle(BTCV, tmp_path)

    def breaks(meta):
        del meta["task"]
        meta["version"] = "1.0"
        meta["monai_version"] = "99.0.0"
        del meta["network_data_format"]["inputs"]["image"]["dtype"]
        del meta["network_data_format"]["outputs"]["pred"]["channel_def"]["13"]
        meta["required_packages_version"]["nibabel"] = "999.0"

    edit_json(bundle / "configs" / "metadata.json", breaks)
    with pytest.raises(ZooCheckError) as e:
        check_metadata(bundle)
    problems = e.value.problems
    assert "task: missing" in problems
    assert "network_data_format.inputs.image.dtype: missing" in problems
    assert "changelog: no entry for the version 1.0" in problems
    assert any(p.startswith("version: '1.0' does not match") for p in problems), problems
    assert any(p.startswith("monai_version: 99.0.0 is newer than the installed monai") for p in problems), problems
    assert any(p.startswith("required_packages_version.nibabel: 999.0 is newer") for p in problems), problems
    assert any(p.startswith("network_data_format.outputs.pred.channel_def: names channels") for p in problems)
    assert len(problems) == 7, problems


def test_package_versions_under_either_name_not_both_and_published_versions_refused(tmp_path):
    bundle = copy_bundle(BTCV, tmp_path)
    meta_file = bundle / "configs" / "metadata.json"
    version = json.loads(meta_file.read_text(encoding="utf-8"))["version"]
    assert check_metadata(bundle).startswith(f"valid against ci/metadata_schema.json; version {version} in changelog")
    # the model zoo's older name, which MONAI 1.6 maps to required_packages_version
    edit_json(meta_file, lambda m: m.update(optional_packages_version=m.pop("required_packages_version")))
    check_metadata(bundle)
    edit_json(meta_file, lambda m: m.update(required_packages_version={}))
    with pytest.raises(ZooCheckError, match="required_packages_version: missing, or given together"):
        check_metadata(bundle)
    edit_json(meta_file, lambda m: m.pop("optional_packages_version"))
    index = tmp_path / "model_info.json"
    index.write_text(
        json.dumps({f"swin_unetr_btcv_v{version}": {"checksum": OTHER_HASH, "source": "file:///x.zip"}}),
        encoding="utf-8",
    )
    with pytest.raises(ZooCheckError, match=rf"version: {version} is already published in .*model_info.json"):
        check_metadata(bundle, index=index)


def test_misformatted_json_is_reported_with_file_and_line(tmp_path):
    bundle = copy_bundle(BTCV, tmp_path)
    path = bundle / "configs" / "inference.json"
    path.write_text(json.dumps(json.loads(path.read_text(encoding="utf-8")), indent=2) + "\n", encoding="utf-8")
    with pytest.raises(ZooCheckError, match=r"configs/inference.json: line 2 reads '  \"imports\": \[', the zoo's"):
        check_json_format(bundle)
    path.write_text(
        json.dumps(json.loads(path.read_text(encoding="utf-8")), indent=4), encoding="utf-8"
    )  # no final newline
    with pytest.raises(ZooCheckError, match="inference.json: differs .* at the end of the file"):
        check_json_format(bundle)


def test_large_files_listing_is_checked_as_verified_path_reads_it(tmp_path):
    bundle = copy_bundle(BTCV, tmp_path)
    (bundle / "models").mkdir()
    weights = bundle / "models" / "model.pt"
    weights.write_bytes(b"weights")
    listing = bundle / "large_files.yml"
    entry = '  - path: "models/model.pt"\n    url: "https://example.org/model.pt"\n    hash_type: "sha256"\n'
    listing.write_text(f"large_files:\n{entry}    hash_val: {sha256(weights)!r}\n", encoding="utf-8")
    assert "large_files.yml lists 1 file(s)" in check_files(bundle)
    assert verified_path(str(weights), str(bundle)) == str(weights)

    listing.write_text(
        f"large_files:\n{entry}    hash_val: {OTHER_HASH!r}\n", encoding="utf-8"
    )  # another file's checksum
    with pytest.raises(ZooCheckError, match=f"models/model.pt: the file present has sha256 {sha256(weights)}"):
        check_files(bundle)
    with pytest.raises(ValueError, match="checksum does not match"):  # the bundles' loader refuses it too
        verified_path(str(weights), str(bundle))

    listing.write_text(
        "large_files:\n"
        '  - path: "../model.pt"\n    url: "https://example.org/model.pt"\n    hash_type: "sha256"\n'
        f"    hash_val: {OTHER_HASH!r}\n"
        '  - path: "models/other.pt"\n    hash_type: "md5"\n    hash_val: "abc"\n',
        encoding="utf-8",
    )
    (bundle / "large_files.yaml").write_text("large_files: []\n", encoding="utf-8")
    (bundle / "LICENSE").unlink()
    with pytest.raises(ZooCheckError) as e:
        check_files(bundle)
    assert e.value.problems == [
        "LICENSE: missing",
        "large_files.yaml: custom.networks.weights.verified_path reads only large_files.yml: rename it, or its files are "
        "never checked",
        "large_files.yml: ../model.pt: path must lie under models/ (relative to the bundle root)",
        "large_files.yml: models/other.pt: url missing or not an http(s) URL, got None",
        "large_files.yml: models/other.pt: hash_type must be sha256, got 'md5'",
        "large_files.yml: models/other.pt: hash_val must be 64 lower-case hex digits (a sha256), got 'abc'",
    ]


def test_output_channels_differing_from_metadata_fail_verify_net_in_out(tmp_path):
    bundle = copy_bundle(SSL, tmp_path)

    def two_channels(meta):
        fmt = meta["network_data_format"]
        fmt["inputs"]["image"]["spatial_shape"] = [64, 64, 64]  # quick
        fmt["outputs"]["pred"].update(num_channels=2, channel_def={"0": "a", "1": "b"})

    edit_json(bundle / "configs" / "metadata.json", two_channels)
    with pytest.raises(ZooCheckError, match="output channel number `1` doesn't match: `2`"):
        check_net_in_out(bundle, {"feature_size": 12})


@pytest.mark.parametrize("bundle", [BTCV, MSD], ids=["btcv", "msd"])
def test_network_def_builds_with_neither_weights_nor_data(tmp_path, bundle):
    """The zoo's verify_net_in_out runs on the bundle as published: no model.pt, no task folder. The task is
    then the one the metadata declares (MSD: Spleen, 1 channel in, 2 out)."""
    copy = copy_bundle(bundle, tmp_path)
    said = check_net_in_out(copy, {"feature_size": 12})
    pred = json.loads((copy / "configs" / "metadata.json").read_text(encoding="utf-8"))["network_data_format"]
    assert f"gives {pred['outputs']['pred']['num_channels']} float32 channel(s)" in said


def test_missing_property_is_named(tmp_path, sample_dir):
    bundle = copy_bundle(BTCV, tmp_path)
    edit_json(bundle / "configs" / "inference.json", lambda c: c.pop("inferer"))
    overrides = bundle_overrides(bundle, tmp_path / "inputs", sample_dir)
    with pytest.raises(ZooCheckError, match=r"infer workflow \(configs/inference.json\): .*`@inferer` is not defined"):
        check_properties(bundle, overrides, workflows=[("infer", ["configs/inference.json"])])


def test_command_line_reports_each_check_and_exits_non_zero_on_failure(tmp_path):
    ok = subprocess.run(
        [*CLI, "swin_unetr_btcv", "--checks", "files,metadata,json_format"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert [line.split()[:3] for line in ok.stdout.splitlines()[:3]] == [
        ["PASS", "swin_unetr_btcv", "files"],
        ["PASS", "swin_unetr_btcv", "metadata"],
        ["PASS", "swin_unetr_btcv", "json_format"],
    ]
    assert ok.stdout.rstrip().endswith("zoo checks: 3 passed, 0 failed")

    bundle = copy_bundle(BTCV, tmp_path)
    edit_json(bundle / "configs" / "metadata.json", lambda m: m.pop("intended_use"))
    train = bundle / "configs" / "train.json"
    train.write_text(json.dumps(json.loads(train.read_text(encoding="utf-8"))), encoding="utf-8")  # one line
    bad = subprocess.run(
        [*CLI, str(bundle), "--checks", "files,metadata,json_format"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "FAIL  swin_unetr_btcv  metadata" in bad.stdout and "intended_use: missing" in bad.stdout
    assert "FAIL  swin_unetr_btcv  json_format" in bad.stdout and "configs/train.json: line 1 reads" in bad.stdout
    assert bad.stdout.rstrip().endswith("zoo checks: 1 passed, 2 failed")
    unknown = subprocess.run([*CLI, "--checks", "nope"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert unknown.returncode == 2 and "unknown checks ['nope']" in unknown.stderr
