"""Label import: TotalSegmentator v2 labels of the real sample into the 13 BTCV classes."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from custom.tools.label_import import TOTALSEG_V2_TO_BTCV, import_labels, load_mapping, main, remap_labels

#: voxel counts per BTCV class in the sample slab, from shared/data/ct_sample/README.md
README_COUNTS = {
    1: 9452,
    2: 3947,
    3: 3676,
    4: 1333,
    6: 38634,
    7: 4675,
    8: 997,
    9: 1368,
    10: 901,
    11: 644,
    12: 152,
    13: 184,
}


def test_sample_slab_imports_to_the_readme_counts(tmp_path, sample_dir):
    src = sample_dir / "labels_slab_totalseg.nii.gz"
    dst = tmp_path / "label0001.nii.gz"
    counts = import_labels(str(src), str(dst), "totalsegmentator_v2_to_btcv")
    assert {k: v for k, v in counts.items() if k} == README_COUNTS  # no esophagus (5) in these slices
    out, ref = nib.load(dst), nib.load(src)
    assert out.shape == ref.shape and np.allclose(out.affine, ref.affine)
    assert out.get_data_dtype() == np.uint8
    src_data = np.asarray(ref.dataobj)
    out_data = np.asarray(out.dataobj)
    # every TotalSegmentator class outside the map (e.g. 10..14 lungs, vertebrae) became background
    unmapped = ~np.isin(src_data, list(TOTALSEG_V2_TO_BTCV))
    assert unmapped.any() and (out_data[unmapped] == 0).all()
    assert (out_data[src_data == 5] == 6).all()  # liver


def test_remap_rejects_fractional_and_negative_values():
    with pytest.raises(ValueError, match="fractional"):
        remap_labels(np.array([0.0, 1.5]), {1: 1})
    with pytest.raises(ValueError, match="negative"):
        remap_labels(np.array([-1, 1]), {1: 1})


def test_import_never_overwrites(tmp_path, sample_dir):
    src = sample_dir / "labels_slab_totalseg.nii.gz"
    dst = tmp_path / "l.nii.gz"
    dst.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="exists"):
        import_labels(str(src), str(dst), "totalsegmentator_v2_to_btcv")
    assert dst.read_bytes() == b"precious"
    with pytest.raises(FileExistsError, match="source"):
        import_labels(str(src), str(src), "totalsegmentator_v2_to_btcv", overwrite=True)


def test_mapping_from_json_file_and_errors(tmp_path):
    f = tmp_path / "map.json"
    f.write_text(json.dumps({"7": 1, "9": 2}), encoding="utf-8")
    assert load_mapping(str(f)) == {7: 1, 9: 2}
    assert remap_labels(np.array([7, 9, 3]), load_mapping(str(f))).tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="neither a built-in"):
        load_mapping("no_such_mapping")
    f.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_mapping(str(f))


def test_cli_reports_errors_with_status(tmp_path, capsys):
    assert (
        main(
            [
                "--src",
                str(tmp_path / "missing.nii.gz"),
                "--dst",
                str(tmp_path / "o.nii.gz"),
                "--mapping",
                "totalsegmentator_v2_to_btcv",
            ]
        )
        == 1
    )
    assert "missing.nii.gz" in capsys.readouterr().err
