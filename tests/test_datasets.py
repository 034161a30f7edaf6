"""Training augmentations, TTA views and the TLM training datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2

from dipid.errors import LabelError, UnknownNameError
from dipid.io import fill_bad_pixels, open_scan
from dipid.io.coco import FrameLabels, LabelSet, read_coco, write_coco
from dipid.models.normalize import normalize_counts
from dipid.synth import simulate_dataset
from dipid.train import datasets as ds
from dipid.train.augment import (
    PoissonNoise,
    RandomBackground,
    RandomIntensityScale,
    RandomRot180,
    boxes_from_masks,
    build_augmentation,
    make_sample,
    tta_views,
)
from dipid.train.datasets import (
    LabelledFrames,
    MixedFrames,
    PeakCrops,
    SimSpec,
    SimulatedFrames,
    collate_detection,
    crop_sample,
    frame_sample,
    load_training_data,
    parse_sim_spec,
)

H, W = 20, 30


def two_peaks() -> tuple[np.ndarray, np.ndarray]:
    """A 20 x 30 frame, background 1 count, with two bright rectangles and their masks."""
    counts = np.ones((H, W), np.float32)
    masks = np.zeros((2, H, W), bool)
    masks[0, 2:6, 3:9] = True    # rows 2..5, columns 3..8
    masks[1, 12:15, 20:22] = True  # rows 12..14, columns 20..21
    counts[masks[0]] = 5000
    counts[masks[1]] = 20000
    return counts, masks


def plain(x):
    return x.as_subclass(torch.Tensor) if isinstance(x, torch.Tensor) else x


def assert_geometry_consistent(image, target, threshold=100.0):
    masks = plain(target["masks"])
    assert masks.dtype == torch.uint8
    # the bright pixels of the image are exactly the masked ones
    assert torch.equal(plain(image)[0] > threshold, masks.bool().any(dim=0))
    torch.testing.assert_close(plain(target["boxes"]), boxes_from_masks(masks), rtol=0, atol=0)
    assert torch.equal(plain(target["labels"]), torch.ones(len(masks), dtype=torch.int64))


# --- boxes ------------------------------------------------------------------------------------------

def test_boxes_are_pixel_edges():
    masks = torch.zeros((3, 10, 12), dtype=torch.uint8)
    masks[0, 2:5, 3:8] = 1
    masks[1, 9, 11] = 1  # one pixel in the corner
    boxes = boxes_from_masks(masks)
    expected = torch.tensor([[3, 2, 8, 5], [11, 9, 12, 10], [0, 0, 0, 0]], dtype=torch.float32)
    assert torch.equal(boxes, expected)


# --- geometric augmentations ---------------------------------------------------------------------------

@pytest.mark.parametrize("transform, rows0, cols0", [
    (v2.RandomHorizontalFlip(p=1.0), (2, 6), (W - 9, W - 3)),
    (v2.RandomVerticalFlip(p=1.0), (H - 6, H - 2), (3, 9)),
    (RandomRot180(p=1.0), (H - 6, H - 2), (W - 9, W - 3)),
])
def test_bright_square_moves_with_its_mask_and_box(transform, rows0, cols0):
    image, target = make_sample(*two_peaks())
    out_image, out_target = transform(image, target)
    assert isinstance(out_image, tv_tensors.Image) and isinstance(out_target["masks"], tv_tensors.Mask)
    assert_geometry_consistent(out_image, out_target)
    (r0, r1), (c0, c1) = rows0, cols0
    expected = torch.zeros((H, W), dtype=torch.uint8)
    expected[r0:r1, c0:c1] = 1
    assert torch.equal(plain(out_target["masks"])[0], expected)
    assert plain(out_target["boxes"])[0].tolist() == [c0, r0, c1, r1]
    assert float(out_image[0, r0, c0]) == 5000.0


def test_rot180_twice_is_identity():
    image, target = make_sample(*two_peaks())
    rot = RandomRot180(p=1.0)
    once = rot(image, target)
    twice = rot(*once)
    assert not torch.equal(plain(once[0]), plain(image))
    assert torch.equal(plain(twice[0]), plain(image))
    for key in ("boxes", "masks", "labels"):
        assert torch.equal(plain(twice[1][key]), plain(target[key]))


def test_full_augmentation_keeps_masks_boxes_and_image_together():
    counts, masks = two_peaks()
    aug = build_augmentation(p=0.5)
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        image, target = aug(*make_sample(counts, masks))
        # peaks stay >= 5000 * 0.25 counts while background + ramp + noise stay far below 500
        assert_geometry_consistent(image, target, threshold=500.0)
        assert (plain(image) >= 0).all()
        seen.add(tuple(plain(target["boxes"])[0].tolist()))
    assert len(seen) >= 3  # the flips did happen, in different combinations


def test_augmentation_is_deterministic_given_the_seed():
    aug = build_augmentation(p=0.5)
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(aug(*make_sample(*two_peaks())))
    assert torch.equal(plain(runs[0][0]), plain(runs[1][0]))
    assert torch.equal(plain(runs[0][1]["masks"]), plain(runs[1][1]["masks"]))
    assert not torch.equal(plain(runs[0][0]), plain(runs[2][0]))


def test_disabled_or_never_applied_augmentation_is_identity():
    image, target = make_sample(*two_peaks())
    for aug in (build_augmentation(flips=False, rot180=False, intensity=False, background=False, noise=False),
                build_augmentation(p=0.0)):
        out_image, out_target = aug(image, target)
        assert torch.equal(plain(out_image), plain(image))
        assert torch.equal(plain(out_target["boxes"]), plain(target["boxes"]))


# --- intensity augmentations ---------------------------------------------------------------------------

def test_intensity_transforms_leave_geometry_alone():
    image, target = make_sample(*two_peaks())
    torch.manual_seed(0)
    out_image, out_target = build_augmentation(flips=False, rot180=False, p=1.0)(image, target)
    assert not torch.equal(plain(out_image), plain(image))
    for key in ("boxes", "masks", "labels"):
        assert torch.equal(plain(out_target[key]), plain(target[key]))
    assert isinstance(out_target["boxes"], tv_tensors.BoundingBoxes)


def test_intensity_scale_is_one_log_uniform_factor():
    image, target = make_sample(*two_peaks())
    factors = []
    for seed in range(30):
        torch.manual_seed(seed)
        out, _ = RandomIntensityScale(factor_range=(0.25, 4.0), p=1.0)(image, target)
        ratio = plain(out) / plain(image)
        assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio))
        factors.append(float(ratio.flatten()[0]))
    factors = np.array(factors)
    assert factors.min() >= 0.25 and factors.max() <= 4.0
    assert (factors < 1).sum() >= 5 and (factors > 1).sum() >= 5  # log-uniform: as often below 1 as above


def test_background_adds_a_non_negative_plane():
    image = tv_tensors.Image(torch.zeros((1, H, W)))
    torch.manual_seed(3)
    added = plain(RandomBackground(level_range=(2.0, 5.0), slope_range=(4.0, 10.0), p=1.0)(image))[0].double()
    assert 2.0 - 1e-4 <= float(added.min()) <= 5.0 + 1e-4
    assert 4.0 - 1e-3 <= float(added.max() - added.min()) <= 10.0 + 1e-3
    # a plane: second differences vanish along both axes
    assert torch.allclose(added.diff(n=2, dim=0), torch.zeros(1, dtype=torch.float64), atol=1e-3)
    assert torch.allclose(added.diff(n=2, dim=1), torch.zeros(1, dtype=torch.float64), atol=1e-3)


def test_poisson_noise_resamples_counts():
    image = tv_tensors.Image(torch.full((1, 200, 200), 50.0))
    torch.manual_seed(0)
    out = plain(PoissonNoise(p=1.0)(image))
    assert torch.equal(out, out.round())  # integer counts
    assert abs(float(out.mean()) - 50.0) < 0.5
    assert abs(float(out.var()) - 50.0) < 3.0  # Poisson: variance = mean


# --- test-time augmentation -------------------------------------------------------------------------------

def test_tta_inverse_undoes_forward_for_tensors_and_arrays():
    views = tta_views()
    assert [v.name for v in views] == ["identity", "hflip", "vflip", "rot180"]
    x = torch.arange(2 * 5 * 7, dtype=torch.float32).reshape(2, 5, 7)
    a = x.numpy().copy()
    forwards = []
    for forward, inverse in views:  # iterating a view gives (forward, inverse)
        assert torch.equal(inverse(forward(x)), x)
        np.testing.assert_array_equal(inverse(forward(a)), a)
        assert forward(a).flags.c_contiguous
        forwards.append(forward(x))
    assert torch.equal(forwards[1], x.flip(-1)) and torch.equal(forwards[2], x.flip(-2))
    assert torch.equal(forwards[3], x.flip(-1).flip(-2))
    assert len({f.numpy().tobytes() for f in forwards}) == 4


def test_tta_inverse_boxes_match_masks():
    _, masks = two_peaks()
    masks_t = torch.as_tensor(masks)
    for view in tta_views():
        seen_boxes = boxes_from_masks(view.forward(masks_t))
        back = view.inverse_boxes(seen_boxes, (H, W))
        assert torch.equal(back, boxes_from_masks(masks_t)), view.name


# --- one sample ---------------------------------------------------------------------------------------------

def test_frame_sample_normalises_and_handles_empty_frames():
    counts, masks = two_peaks()
    image, target = frame_sample(counts, masks)
    assert image.shape == (1, H, W) and image.dtype == torch.float32 and type(image) is torch.Tensor
    assert torch.equal(image, normalize_counts(torch.from_numpy(counts)[None]))
    assert target["masks"].shape == (2, H, W) and type(target["boxes"]) is torch.Tensor

    image, target = frame_sample(counts, np.zeros((0, H, W), bool))
    assert image.shape == (1, H, W)
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    assert target["masks"].shape == (0, H, W) and target["masks"].dtype == torch.uint8

    # an instance with no pixel cannot be trained on and is dropped
    with_empty = np.concatenate([masks, np.zeros((1, H, W), bool)])
    assert len(frame_sample(counts, with_empty)[1]["labels"]) == 2


def test_augmentation_acts_on_counts_before_normalisation():
    counts, masks = two_peaks()
    seen = []

    def spy(image, target):
        seen.append(plain(image).clone())
        return image, target

    frame_sample(counts, masks, augment=spy)
    assert torch.equal(seen[0][0], torch.from_numpy(counts))


def test_bad_pixels_follow_the_geometry():
    counts, masks = two_peaks()
    bad = np.zeros((H, W), bool)
    bad[0, 0] = True
    _, target = frame_sample(counts, masks, augment=v2.RandomHorizontalFlip(p=1.0), bad_pixels=bad)
    assert target["bad_pixels"].dtype == torch.bool
    assert torch.equal(target["bad_pixels"], torch.from_numpy(bad[:, ::-1].copy()))
    assert torch.equal(target["boxes"], boxes_from_masks(target["masks"]))


# --- labelled frames from scan files -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sim_folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("simset")
    simulate_dataset(out, n_scans=2, n_frames=3, seed=5, progress=False)
    return out


def test_labelled_frames_read_the_scan_and_its_labels(sim_folder, tmp_path, monkeypatch):
    labels = read_coco(sim_folder / "sim_00000_labels.json")
    empty = [k for k, fl in enumerate(labels) if len(fl) == 0]
    assert empty and len(empty) < len(labels)  # the short scan has frames with and without a peak

    opened = []
    real_open = ds._open_scan
    monkeypatch.setattr(ds, "_open_scan", lambda path: opened.append(path) or real_open(path))
    data = LabelledFrames(labels, with_bad_pixels=True)
    assert len(data) == 3
    scan = open_scan(sim_folder / "sim_00000.nxs")
    for k, fl in enumerate(labels):
        image, target = data[k]
        assert image.shape == (1, 195, 487) and image.dtype == torch.float32
        assert torch.equal(image, normalize_counts(torch.from_numpy(scan[fl.frame])[None]))
        assert torch.equal(target["masks"].bool(), torch.from_numpy(fl.masks()))
        assert target["masks"].dtype == torch.uint8 and target["labels"].dtype == torch.int64
        assert torch.equal(target["boxes"], boxes_from_masks(target["masks"]))
        assert (target["boxes"][:, 2:] > target["boxes"][:, :2]).all()  # Mask R-CNN rejects empty boxes
        batch = next(iter(scan.iter_frames(fl.frame, fl.frame + 1, 1)))
        assert torch.equal(target["bad_pixels"], torch.from_numpy(batch.bad_pixels[0]))
    for k in empty:
        target = data[k][1]
        assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, 195, 487)
        assert target["labels"].shape == (0,)
    assert len(opened) == 1  # one open scan per file, not one per sample
    scan.close()
    data.close()

    # a label file whose scans are missing fails at once, naming the file
    moved = write_coco(labels, tmp_path / "elsewhere.json")
    with pytest.raises(LabelError, match="sim_00000.nxs"):
        LabelledFrames(read_coco(moved))


def test_labelled_frames_with_augmentation_in_workers(sim_folder):
    data = load_training_data(sim_folder, augment=build_augmentation(p=0.5))
    assert isinstance(data, ConcatDataset) and len(data) == 6
    torch.manual_seed(0)
    loader = DataLoader(data, batch_size=3, num_workers=2, collate_fn=collate_detection)
    batches = list(loader)
    assert len(batches) == 2
    for images, targets in batches:
        assert images.shape == (3, 1, 195, 487) and images.dtype == torch.float32
        for target in targets:
            assert torch.equal(target["boxes"], boxes_from_masks(target["masks"]))


# --- simulated frames --------------------------------------------------------------------------------------

def test_simulated_frames_are_the_simulator_scans_shuffled(monkeypatch):
    made = []
    real_simulate = ds._simulate_scan

    def record(**kw):
        made.append(real_simulate(**kw))
        return made[-1]

    monkeypatch.setattr(ds, "_simulate_scan", record)
    data = SimulatedFrames(preset=("realistic", "hard"), n_frames=3, scans_per_epoch=2, seed=4)
    assert len(data) == 6
    samples = list(data)
    assert len(samples) == 6 and len(made) == 2
    expected = []  # (normalised image, masks) of every simulated frame, scan by scan
    for sim in made:
        # unmeasured (negative) pixels filled from their neighbours, as dipid.io.Scan does
        filled = fill_bad_pixels(sim.frames, sim.frames < 0)
        for i in range(sim.n_frames):
            expected.append((normalize_counts(torch.from_numpy(filled[i])[None]), sim.labels[i].masks()))
    order = []
    for image, target in samples:
        assert image.shape == (1, 195, 487) and target["boxes"].shape[1] == 4
        assert target["masks"].shape[1:] == (195, 487) and target["masks"].dtype == torch.uint8
        k = next(k for k, (want, _) in enumerate(expected) if torch.equal(image, want))
        assert torch.equal(target["masks"].bool(), torch.from_numpy(expected[k][1]))
        order.append(k)
    assert sorted(order) == list(range(6))
    assert sorted(order[:3]) == [0, 1, 2]  # one scan after the other, each shuffled
    assert order != list(range(6))


def test_simulated_frames_depend_on_seed_and_epoch_not_on_workers():
    def images(data, workers=0):
        loader = DataLoader(data, batch_size=None, num_workers=workers)
        return sorted(float(image.sum()) for image, _ in loader)

    aug = build_augmentation(p=0.5)
    data = SimulatedFrames(n_frames=2, scans_per_epoch=2, seed=1, augment=aug)
    torch.manual_seed(0)
    before = torch.rand(1)
    first = images(data)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1), before)  # the caller's random stream is untouched
    assert images(data) == first
    assert images(data, workers=2) == first
    data.set_epoch(1)
    assert images(data) != first
    assert images(SimulatedFrames(n_frames=2, scans_per_epoch=2, seed=2, augment=aug)) != first


def test_simulated_frames_reject_unknown_preset():
    with pytest.raises(UnknownNameError, match="realistic"):
        SimulatedFrames(preset="nonsense", n_frames=2, scans_per_epoch=1)


# --- describing the training data ----------------------------------------------------------------------------

def test_sim_spec_syntax():
    assert parse_sim_spec("sim:realistic") == SimSpec(("realistic",), None)
    assert parse_sim_spec("sim:hard,realistic:16") == SimSpec(("hard", "realistic"), 16)
    for bad in ("sim:", "sim:realistic:", "sim:realistic:0", "sim:a,,b", "sim:realistic:x"):
        with pytest.raises(LabelError, match="sim:<preset>"):
            parse_sim_spec(bad)


def test_load_training_data_accepts_file_folder_sim_and_lists(sim_folder, tmp_path):
    one = load_training_data(sim_folder / "sim_00001_labels.json")
    assert isinstance(one, LabelledFrames) and len(one) == 3
    sim = load_training_data("sim:hard,realistic:3", n_frames=2)
    assert isinstance(sim, SimulatedFrames) and sim.presets == ("hard", "realistic") and len(sim) == 6
    assert load_training_data("sim:easy", scans_per_epoch=4, n_frames=2).scans_per_epoch == 4
    both = load_training_data([sim_folder / "sim_00000_labels.json", sim_folder / "sim_00001_labels.json"])
    assert isinstance(both, ConcatDataset) and len(both) == 6

    mixed = load_training_data([str(sim_folder / "sim_00000_labels.json"), "sim:easy:1"], n_frames=2)
    assert isinstance(mixed, MixedFrames) and len(mixed) == 5
    samples = list(mixed)
    assert len(samples) == 5
    assert all(image.shape == (1, 195, 487) for image, _ in samples)
    images, targets = collate_detection(samples)
    assert images.shape == (5, 1, 195, 487) and len(targets) == 5

    with pytest.raises(LabelError, match="no such label file"):
        load_training_data(tmp_path / "missing.json")
    with pytest.raises(LabelError, match="_labels.json"):
        load_training_data(tmp_path)


def test_collate_rejects_frames_of_different_sizes():
    a = frame_sample(*two_peaks())
    b = frame_sample(np.ones((8, 9), np.float32), np.zeros((0, 8, 9), bool))
    with pytest.raises(LabelError, match="different sizes"):
        collate_detection([a, b])
    images, targets = collate_detection([a, a])
    assert images.shape == (2, 1, H, W) and targets[0]["masks"].shape == (2, H, W)


def test_labelset_rooted_elsewhere_resolves_scans(sim_folder):
    labels = read_coco(sim_folder / "sim_00000_labels.json")
    absolute = LabelSet(frames=[FrameLabels(scan=str(sim_folder / fl.scan), frame=fl.frame, height=fl.height,
                                            width=fl.width, rles=fl.rles, reflection_ids=fl.reflection_ids)
                                for fl in labels], root=Path("/nonexistent"))
    image, _ = LabelledFrames(absolute)[0]
    assert image.shape == (1, 195, 487)


# --- crops centred on peaks -------------------------------------------------------------------------

def _big_frame(seed: int, n_peaks: int, shape=(100, 160)) -> tuple[np.ndarray, np.ndarray]:
    """Background 1 count with ``n_peaks`` bright 5 x 5 squares at random places, and their masks."""
    rng = np.random.default_rng(seed)
    counts = np.ones(shape, np.float32)
    masks = np.zeros((n_peaks, *shape), bool)
    for k in range(n_peaks):
        r, c = rng.integers(0, shape[0] - 5), rng.integers(0, shape[1] - 5)
        masks[k, r : r + 5, c : c + 5] = True
        counts[masks[k]] = 10_000
    return counts, masks


def test_crop_sample_cuts_image_masks_and_drops_slivers():
    image, target = frame_sample(*two_peaks())
    # rows 0..9, columns 5..16: peak 0 keeps columns 5..8 (4 x 4 = 16 px), peak 1 is outside
    crop_image, crop_target = crop_sample((image, target), 0, 5, 10, 12, min_area=4)
    assert crop_image.shape == (1, 10, 12)
    assert torch.equal(crop_image, image[:, 0:10, 5:17])
    assert crop_target["masks"].shape == (1, 10, 12) and int(crop_target["masks"].sum()) == 16
    assert crop_target["boxes"].tolist() == [[0.0, 2.0, 4.0, 6.0]]
    assert_geometry_consistent(crop_image, crop_target, threshold=0.5)
    # a window holding only 2 columns (8 px) of peak 0 drops it when 9 px are required
    _, sliver = crop_sample((image, target), 0, 7, 10, 12, min_area=9)
    assert len(sliver["masks"]) == 0 and sliver["boxes"].shape == (0, 4) and sliver["labels"].shape == (0,)


def test_peak_crops_are_mostly_on_peaks_and_consistent():
    frames = [frame_sample(*_big_frame(seed, 2)) for seed in range(6)]
    crops = PeakCrops(frames, size=(48, 48), crops_per_frame=8, background_fraction=0.0, seed=1)
    samples = list(crops)
    assert len(samples) == len(crops) == 48
    for image, target in samples:
        assert image.shape == (1, 48, 48)
        assert len(target["masks"]) >= 1  # every crop is centred on a peak (the 5 x 5 square fits)
        assert_geometry_consistent(image, target, threshold=0.5)


def test_peak_crops_background_share_and_empty_frames():
    frames = [frame_sample(*_big_frame(seed, 1)) for seed in range(20)]
    only_background = PeakCrops(frames, size=(32, 32), crops_per_frame=4, background_fraction=1.0, seed=0)
    with_peak = sum(len(t["masks"]) > 0 for _, t in only_background)
    # 32 x 32 windows anywhere in a 100 x 160 frame hold the single peak about 8 % of the time
    assert with_peak < 0.3 * len(only_background)
    empty = [frame_sample(np.ones((100, 160), np.float32), np.zeros((0, 100, 160), bool))]
    crops = list(PeakCrops(empty, size=(64, 64), crops_per_frame=3, background_fraction=0.0))
    assert len(crops) == 3 and all(len(t["masks"]) == 0 for _, t in crops)


def test_peak_crops_depend_on_seed_and_epoch_and_clip_to_small_frames():
    frames = [frame_sample(*_big_frame(seed, 2)) for seed in range(4)]
    first = [img for img, _ in PeakCrops(frames, size=(40, 40), seed=3)]
    again = [img for img, _ in PeakCrops(frames, size=(40, 40), seed=3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other = PeakCrops(frames, size=(40, 40), seed=3)
    other.set_epoch(1)
    assert not all(torch.equal(a, b) for a, b in zip(first, [img for img, _ in other]))
    small = [frame_sample(*two_peaks())]  # 20 x 30: the window shrinks to the frame
    assert {tuple(img.shape) for img, _ in PeakCrops(small, size=(128, 128), crops_per_frame=2)} == {(1, H, W)}
    with pytest.raises(ValueError):
        PeakCrops(frames, size=(16, 16))
