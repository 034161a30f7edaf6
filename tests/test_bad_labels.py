"""Bad COCO label files: read_coco names the file, the annotation (or image) and what to fix, and
the CLI (`dipid evaluate`, `dipid train`) prints one line, exits 2 and writes nothing."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from dipid.cli import main
from dipid.errors import LabelError
from dipid.io.coco import encode_masks, read_coco, rle_string_counts

H, W = 20, 30


def _mask(r0: int, r1: int, c0: int, c1: int, h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((1, h, w), bool)
    m[0, r0:r1, c0:c1] = True
    return m


def valid_doc() -> dict:
    """One frame, three peaks: a polygon, a compressed RLE and an uncompressed RLE."""
    compressed = encode_masks(_mask(2, 6, 3, 9))[0]
    uncompressed_mask = _mask(10, 14, 20, 25)[0]
    runs = [int(v) for v in rle_string_counts(encode_masks(uncompressed_mask[None])[0]["counts"])]
    return {
        "images": [{"id": 1, "file_name": "scan.nxs#4", "height": H, "width": W}],
        "annotations": [
            {"id": 11, "image_id": 1, "category_id": 1, "segmentation": [[1.0, 1.0, 8.0, 1.0, 8.0, 6.0, 1.0, 6.0]]},
            {"id": 12, "image_id": 1, "category_id": 1, "segmentation": {"size": [H, W], "counts": compressed["counts"]}},
            {"id": 13, "image_id": 1, "category_id": 1, "segmentation": {"size": [H, W], "counts": runs}},
        ],
        "categories": [{"id": 1, "name": "peak"}],
    }


def write(tmp_path: Path, doc: dict, name: str = "labels.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc))  # allow_nan: NaN and Infinity are written as JSON's extensions
    return path


def _ann(doc: dict, ann_id: int) -> dict:
    return next(a for a in doc["annotations"] if a["id"] == ann_id)


def _set(ann_id: int, key: str, value):
    def change(doc):
        _ann(doc, ann_id)[key] = value
    return change


def _drop(ann_id: int, key: str):
    def change(doc):
        del _ann(doc, ann_id)[key]
    return change


def _rle_counts_sum_wrong(doc):  # compressed RLE of a 20 x 31 mask labelled as 20 x 30
    _ann(doc, 12)["segmentation"] = {"size": [H, W], "counts": encode_masks(_mask(2, 6, 3, 9, H, W + 1))[0]["counts"]}


def _image(key: str, value=None, *, delete: bool = False):
    def change(doc):
        if delete:
            del doc["images"][0][key]
        else:
            doc["images"][0][key] = value
    return change


def _duplicate_image(doc):
    doc["images"].append({"id": 1, "file_name": "scan.nxs#5", "height": H, "width": W})


def _duplicate_annotation(doc):
    doc["annotations"].append(dict(_ann(doc, 12)))


# (case, change to the valid document, who the message must name, words it must contain)
CASES = [
    ("unknown image_id", _set(12, "image_id", 99), "annotation 12", ["image_id 99", "add the image"]),
    ("unknown category_id", _set(12, "category_id", 7), "annotation 12", ["category_id 7", "categories"]),
    ("uncompressed RLE counts sum", _set(13, "segmentation", {"size": [H, W], "counts": [10, 5]}), "annotation 13",
     ["add up to 15", f"{H} x {W} = {H * W}"]),
    ("compressed RLE counts sum", _rle_counts_sum_wrong, "annotation 12", [f"add up to {H * (W + 1)}", f"= {H * W}"]),
    ("RLE size differs from the image", _set(12, "segmentation", {"size": [H + 1, W], "counts": "abc"}),
     "annotation 12", [f"size {H + 1} x {W}", f"{H} x {W}", "image 1"]),
    ("RLE counts not COCO", _set(12, "segmentation", {"size": [H, W], "counts": "a b~"}), "annotation 12",
     ["not a valid compressed COCO RLE"]),
    ("RLE negative run", _set(13, "segmentation", {"size": [H, W], "counts": [700, -100]}), "annotation 13",
     ["-100", "integers >= 0"]),
    ("RLE without size", _set(12, "segmentation", {"counts": "abc"}), "annotation 12", ["no 'size'"]),
    ("RLE counts of a wrong type", _set(12, "segmentation", {"size": [H, W], "counts": 5}), "annotation 12",
     ["'counts' is 5"]),
    ("polygon of 2 points", _set(11, "segmentation", [[1, 1, 8, 1]]), "annotation 11",
     ["2 point", "at least 3"]),
    ("polygon of 1 point", _set(11, "segmentation", [[1, 1]]), "annotation 11", ["1 point", "at least 3"]),
    ("second polygon of 2 points", _set(11, "segmentation", [[1, 1, 8, 1, 8, 6], [1, 1, 2, 2]]), "annotation 11",
     ["polygon 2", "2 point"]),
    ("odd number of coordinates", _set(11, "segmentation", [[1, 1, 8, 1, 8, 6, 1]]), "annotation 11",
     ["7 coordinates", "odd"]),
    ("coordinate is a string", _set(11, "segmentation", [[1, 1, "8", 1, 8, 6]]), "annotation 11",
     ["coordinate 3", "'8'", "finite numbers"]),
    ("coordinate is null", _set(11, "segmentation", [[1, 1, 8, None, 8, 6]]), "annotation 11",
     ["coordinate 4", "None"]),
    ("coordinate is NaN", _set(11, "segmentation", [[1, 1, 8, 1, float("nan"), 6]]), "annotation 11",
     ["coordinate 5", "nan"]),
    ("coordinate is infinite", _set(11, "segmentation", [[1, 1, 8, 1, 8, float("inf")]]), "annotation 11",
     ["coordinate 6", "inf"]),
    ("coordinate is a bool", _set(11, "segmentation", [[1, 1, 8, 1, 8, True]]), "annotation 11", ["coordinate 6"]),
    ("polygon is not a list", _set(11, "segmentation", [5]), "annotation 11", ["polygon 1 is 5"]),
    ("no polygons", _set(11, "segmentation", []), "annotation 11", ["empty list"]),
    ("segmentation missing", _drop(11, "segmentation"), "annotation 11", ["no 'segmentation'"]),
    ("segmentation is a string", _set(11, "segmentation", "polygon"), "annotation 11", ["'polygon'", "RLE"]),
    ("segmentation is null", _set(11, "segmentation", None), "annotation 11", ["None"]),
    ("image_id missing", _drop(12, "image_id"), "annotation 12", ["no 'image_id'"]),
    ("category_id missing", _drop(12, "category_id"), "annotation 12", ["no 'category_id'"]),
    ("reflection_id not an integer", _set(12, "reflection_id", "r7"), "annotation 12", ["reflection_id 'r7'"]),
    ("image without width", _image("width", delete=True), "image 1", ["no 'width'", "height and width"]),
    ("image without height", _image("height", delete=True), "image 1", ["no 'height'"]),
    ("image with a bad height", _image("height", "195"), "image 1", ["bad 'height'", "'195'"]),
    ("image without file_name", _image("file_name", delete=True), "image 1", ["no 'file_name'", "#<frame>"]),
    ("file_name without a frame number", _image("file_name", "scan.nxs#x"), "image 1", ["'scan.nxs#x'", "#<frame>"]),
    ("duplicate image id", _duplicate_image, "image id 1", ["appears 2 times", "its own id"]),
    ("duplicate annotation id", _duplicate_annotation, "annotation id 12", ["appears 2 times", "its own id"]),
]
IDS = [c[0] for c in CASES]


def test_the_valid_document_reads(tmp_path):
    labels = read_coco(write(tmp_path, valid_doc()))
    (frame,) = labels.frames
    assert (frame.scan, frame.frame, frame.height, frame.width, len(frame)) == ("scan.nxs", 4, H, W, 3)
    masks = frame.masks()
    assert masks[1].sum() == 4 * 6 and masks[1, 2:6, 3:9].all()
    assert masks[2].sum() == 4 * 5 and masks[2, 10:14, 20:25].all()
    assert masks[0].sum() > 0


@pytest.mark.parametrize("case, change, who, words", CASES, ids=IDS)
def test_read_coco_names_file_annotation_and_fix(tmp_path, case, change, who, words):
    doc = valid_doc()
    change(doc)
    path = write(tmp_path, doc)
    with pytest.raises(LabelError) as info:
        read_coco(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert f"{who} " in message or f"{who}:" in message, message
    for word in words:
        assert word in message, (word, message)
    assert "\n" not in message and "more problem" not in message, message  # one problem each


def test_every_problem_is_counted(tmp_path):
    doc = valid_doc()
    _set(11, "segmentation", [[1, 1, 2, 2]])(doc)
    _set(12, "image_id", 5)(doc)
    _set(13, "category_id", 3)(doc)
    with pytest.raises(LabelError, match=r"annotation 11 .*\(2 more problems in this file\)$"):
        read_coco(write(tmp_path, doc))


def test_annotation_without_id_is_named_by_position(tmp_path):
    doc = valid_doc()
    del _ann(doc, 13)["id"]
    with pytest.raises(LabelError, match=r"annotation at annotations\[2\] has no 'id'"):
        read_coco(write(tmp_path, doc))


@pytest.mark.parametrize("doc, words", [
    ([1, 2], "not an object"),
    ({"images": {}, "annotations": []}, "'images' is a dict"),
    ({"images": [], "annotations": [], "categories": [{"name": "peak"}]}, "'categories'"),
    ({"images": ["scan.nxs#1"], "annotations": []}, "images[0]"),
    ({"images": [], "annotations": [7]}, "annotations[0]"),
])
def test_malformed_structure(tmp_path, doc, words):
    path = write(tmp_path, doc)
    with pytest.raises(LabelError) as info:
        read_coco(path)
    assert str(path) in str(info.value) and words in str(info.value)


def test_rle_string_counts_decodes_pycocotools_strings():
    rng = np.random.default_rng(3)
    for trial in range(60):
        h, w = (int(v) for v in rng.integers(1, 120, 2))
        mask = rng.random((h, w)) < (0.5 if trial % 3 == 0 else 0.02)
        counts = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")
        runs = rle_string_counts(counts)
        assert sum(runs) == h * w and min(runs) >= 0
        flat = np.repeat(np.arange(len(runs)) % 2 == 1, runs)
        np.testing.assert_array_equal(flat.reshape(w, h).T, mask)
    with pytest.raises(ValueError, match="ends inside"):
        rle_string_counts("0" + chr(48 + 0x20))


# ----------------------------------------------------------------------------------- the CLI
def _bad_file(tmp_path: Path, case: str) -> Path:
    change = next(c[1] for c in CASES if c[0] == case)
    doc = copy.deepcopy(valid_doc())
    change(doc)
    return write(tmp_path, doc, "bad_labels.json")


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("dipid: error:") and "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize("case, who", [(c[0], c[2]) for c in CASES], ids=IDS)
def test_evaluate_cli_one_line_exit_2_no_report(tmp_path, capsys, case, who):
    bad = _bad_file(tmp_path, case)
    report = tmp_path / "out" / "report.json"
    assert main(["evaluate", "--model", "classical", "--data", str(bad), "--out", str(report), "--device", "cpu"]) == 2
    line = _one_error_line(capsys)
    assert str(bad) in line and who in line
    assert not report.exists() and not report.parent.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad_labels.json"]


def test_evaluate_cli_folder_of_label_files(tmp_path, capsys):
    folder = tmp_path / "labels"
    folder.mkdir()
    write(folder, valid_doc(), "a_labels.json")
    bad = _bad_file(folder, "polygon of 2 points")
    report = tmp_path / "report.json"
    assert main(["evaluate", "--model", "classical", "--data", str(folder), "--out", str(report)]) == 2
    line = _one_error_line(capsys)
    assert str(bad) in line and "annotation 11" in line
    assert not report.exists()


@pytest.mark.parametrize("case", ["polygon of 2 points", "compressed RLE counts sum", "unknown image_id",
                                  "duplicate annotation id"])
@pytest.mark.parametrize("which", ["--train", "--val"])
def test_train_tlm_cli_one_line_exit_2_no_run_folder(tmp_path, capsys, case, which):
    bad = _bad_file(tmp_path, case)
    other = "sim:easy"
    args = {"--train": other, "--val": other, which: str(bad)}
    run = tmp_path / "run"
    assert main(["train", "tlm", "--train", args["--train"], "--val", args["--val"], "--out", str(run),
                 "--device", "cpu", "--epochs", "1"]) == 2
    line = _one_error_line(capsys)
    assert str(bad) in line and next(c[2] for c in CASES if c[0] == case) in line
    assert not run.exists()


def test_train_sslm_cli_bad_labels_one_line_exit_2_no_run_folder(tmp_path, capsys):
    bad = _bad_file(tmp_path, "RLE size differs from the image")
    run = tmp_path / "run"
    assert main(["train", "sslm", "--scans", "sim:easy", "--out", str(run), "--labels", str(bad),
                 "--device", "cpu", "--steps", "1"]) == 2
    line = _one_error_line(capsys)
    assert str(bad) in line and "annotation 12" in line
    assert not run.exists()
