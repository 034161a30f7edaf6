"""The JointPredictor: the TLM and SSLM (and the classical finder) run together on frames and scans.

Input contract: frames are detector counts, (H, W) or (B, H, W), any real dtype; bad pixels are
negative or listed in a mask and are filled from their neighbours before the networks see them
(:class:`dipid.io.Scan` does this when reading). Everything returned is numpy on the CPU, in the
result objects of :mod:`dipid.results`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dipid.errors import DipidError, WeightsNotFoundError
from dipid.models.device import resolve_device
from dipid.results import SOURCE_FLAGS, ImageResult, Instances, ScanResult, SSLOutput

logger = logging.getLogger(__name__)

__all__ = [
    "JointPredictor",
    "PredictorSettings",
    "DEFAULT_WEIGHTS_DIR",
    "WEIGHT_FILES",
    "SETTINGS_FILE",
    "read_settings",
    "ImageResult",
    "ScanResult",
    "Instances",
]

#: Where ``JointPredictor.from_pretrained()`` looks when given no argument.
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
#: File names of the shipped checkpoints inside a weights folder.
WEIGHT_FILES = {"tlm": "tlm.safetensors", "sslm": "sslm.safetensors"}
#: File of sha256 sums ("<hex>  <file name>" lines) beside shipped weights.
SHA256_FILE = "SHA256SUMS"
#: Optional JSON object of :class:`PredictorSettings` fields tuned for the checkpoints beside it
#: (e.g. the fusion thresholds ``benchmarks/fusion.py`` chooses on validation scans).
SETTINGS_FILE = "settings.json"


@dataclass(frozen=True)
class PredictorSettings:
    """Thresholds of the JointPredictor (all recorded with every result).

    Attributes:
        threshold: minimum TLM instance confidence kept, in [0, 1].
        mask_threshold: TLM per-pixel mask probability that counts as peak.
        ssl_threshold: SSLM per-pixel peak probability that counts as peak.
        min_area: smallest instance kept, pixels.
        nms_iou: mask IoU above which the lower-scored of two instances is dropped (when NMS is on).
        fusion_match_iou: IoU at which an SSLM component confirms a TLM instance.
        fusion_tlm_min_score: TLM score an instance no SSLM component confirms needs to stay in
            `joint` (0: every TLM instance stays).
        fusion_ssl_min_score: mean SSLM probability an unconfirmed SSLM component needs to join `joint`.
        fusion_ssl_min_area: pixels an unconfirmed SSLM component needs to join `joint`.
        fusion_add_unmatched_ssl: whether SSLM-only components join `joint` at all.
        fusion_refine_with_ssl: whether a confirmed TLM instance takes the pixel edges of its
            confirming SSLM components (see :func:`dipid.postprocess.fuse_instances`).
        fusion_refine_margin: pixels around a TLM instance its refined mask may reach.
        fusion_classical: run the classical finder (:func:`dipid.classical.find_peaks_classical`)
            as a third source of evidence for `joint`; the ``fusion_classical_*`` settings say how
            it is used (confirmation, added peaks, pixel edges; see
            :func:`dipid.postprocess.fuse_instances`).
        fusion_classical_min_score, fusion_classical_min_area: what a classical peak no TLM
            instance matches needs to join `joint` (when ``fusion_add_unmatched_classical``).
        fusion_add_unmatched_classical: whether classical-only peaks join `joint`.
        fusion_refine_with_classical: whether a TLM instance a classical peak confirms takes its
            pixel edges.
        tile_size: frames with a side longer than this are predicted in overlapping tiles (pixels).
        tile_overlap: pixels shared by neighbouring tiles; peaks smaller than this are never cut.
        amp: on CUDA, run the networks under bf16 autocast (float32 on the CPU regardless).
        optimize: run inference copies of the models with BatchNorm folded into the convolutions
            and channels-last weights (:func:`dipid.models.inference.inference_copy`); outputs
            equal the unoptimised models' to float rounding. False: plain eval-mode copies.
        proposals: RPN proposals per frame that reach the TLM's box head (None: the model's own
            ``rpn_post_nms_top_n_test``). The box head's cost grows with it.
    """

    threshold: float = 0.4
    mask_threshold: float = 0.5
    ssl_threshold: float = 0.5
    min_area: int = 4
    nms_iou: float = 0.5
    fusion_match_iou: float = 0.1
    fusion_tlm_min_score: float = 0.0
    fusion_ssl_min_score: float = 0.5
    fusion_ssl_min_area: int = 0
    fusion_add_unmatched_ssl: bool = True
    fusion_refine_with_ssl: bool = False
    fusion_refine_margin: int = 2
    fusion_classical: bool = False
    fusion_classical_min_score: float = 0.5
    fusion_classical_min_area: int = 0
    fusion_add_unmatched_classical: bool = False
    fusion_refine_with_classical: bool = False
    tile_size: int = 512
    tile_overlap: int = 64
    amp: bool = True
    optimize: bool = True
    proposals: int | None = None

    def fusion_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`dipid.postprocess.fuse_instances` these settings give."""
        return dict(
            match_iou=self.fusion_match_iou, tlm_min_score=self.fusion_tlm_min_score,
            ssl_min_score=self.fusion_ssl_min_score, ssl_min_area=self.fusion_ssl_min_area,
            add_unmatched_ssl=self.fusion_add_unmatched_ssl, refine_with_ssl=self.fusion_refine_with_ssl,
            refine_margin=self.fusion_refine_margin, nms_iou=self.nms_iou,
            classical_min_score=self.fusion_classical_min_score, classical_min_area=self.fusion_classical_min_area,
            add_unmatched_classical=self.fusion_add_unmatched_classical,
            refine_with_classical=self.fusion_refine_with_classical,
        )


class JointPredictor:
    """Runs the TLM (Mask R-CNN) and the SSLM on detector frames and fuses their peaks.

    ``JointPredictor(tlm=build_tlm(), sslm=build_sslm())`` makes an untrained predictor;
    ``JointPredictor.from_pretrained()`` loads the weights shipped in ``weights/``.
    """

    def __init__(
        self,
        tlm: torch.nn.Module | None = None,
        sslm: torch.nn.Module | None = None,
        *,
        classical: Any | None = None,
        threshold: float = 0.4,
        device: str | torch.device = "auto",
        settings: PredictorSettings | None = None,
        weights_info: dict[str, Any] | None = None,
    ):
        from dipid.classical import ClassicalFinder

        self.device = resolve_device(device)
        base = settings or PredictorSettings()
        self.settings = PredictorSettings(**{**asdict(base), "threshold": threshold if settings is None else base.threshold})
        # The models given stay as they are (they may still be trained or saved); the predictor
        # runs its own eval-mode copies on its device (see PredictorSettings.optimize).
        self.tlm = tlm
        self.sslm = sslm
        self._tlm_run = self._inference_model(tlm)
        self._sslm_run = self._inference_model(sslm)
        if self._tlm_run is not None:
            # Detections under the confidence threshold are dropped anyway: dropping them inside the
            # network spares the mask head (the costliest part per detection) from computing them.
            # Outputs are unchanged: box NMS only ever suppresses a box with a higher-scored one.
            heads = self._tlm_run.net.roi_heads
            heads.score_thresh = max(float(heads.score_thresh), self.settings.threshold)
            if self.settings.proposals is not None:
                self._tlm_run.net.rpn._post_nms_top_n["testing"] = int(self.settings.proposals)
        self.classical = classical if classical is not None else ClassicalFinder()
        self.weights_info = dict(weights_info or {})

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls, path_or_name: str | Path | None = None, *, device: str | torch.device = "auto", **kwargs: Any
    ) -> "JointPredictor":
        """Load checkpoints: none -> the shipped ``weights/``; a folder holding ``tlm.safetensors``
        and/or ``sslm.safetensors`` (or a training run folder with ``best.safetensors``); or one
        checkpoint file. Shipped weights are checked against ``weights/SHA256SUMS``.

        A ``settings.json`` in the folder (settings tuned for these checkpoints) is the starting
        point of the predictor's settings unless ``settings=`` is given; ``threshold=`` still wins.

        Raises:
            WeightsNotFoundError: nothing loadable there; the message says how to get weights.
            DipidError: ``settings.json`` is not a JSON object of known settings.
        """
        from dipid.models import load_checkpoint, sha256_file

        folder = Path(path_or_name) if path_or_name is not None else DEFAULT_WEIGHTS_DIR
        if folder.is_file():
            files = [folder]
        elif folder.is_dir():
            files = [folder / f for f in WEIGHT_FILES.values() if (folder / f).is_file()]
            if not files and (folder / "best.safetensors").is_file():
                files = [folder / "best.safetensors"]
        else:
            files = []
        if not files:
            raise WeightsNotFoundError(
                f"{folder}: no dipid checkpoints found (expected {' and/or '.join(WEIGHT_FILES.values())}). "
                "Train them with `dipid train tlm --train sim:realistic --val sim:hard --out runs/tlm` and "
                "`dipid train sslm --scans SCAN.nxs --out runs/sslm`, then pass the run folder or checkpoint "
                "to JointPredictor.from_pretrained(...), or copy them into weights/ as tlm.safetensors/sslm.safetensors."
            )
        expected = _read_sha256sums(folder / SHA256_FILE) if folder.is_dir() else {}
        models: dict[str, torch.nn.Module] = {}
        info: dict[str, Any] = {}
        for file in files:
            digest = sha256_file(file)
            if file.name in expected and expected[file.name] != digest:
                raise WeightsNotFoundError(
                    f"{file}: sha256 {digest} does not match {expected[file.name]} in {folder / SHA256_FILE}; "
                    "the file is damaged or was replaced: restore it (git checkout weights/) or pass another path."
                )
            model = load_checkpoint(file, device="cpu")
            models[model.name] = model
            info[model.name] = {"path": str(file), "sha256": digest}
        settings_path = folder / SETTINGS_FILE if folder.is_dir() else None
        if settings_path is not None and settings_path.is_file() and kwargs.get("settings") is None:
            tuned = read_settings(settings_path)
            if "threshold" in kwargs:
                tuned["threshold"] = float(kwargs.pop("threshold"))
            kwargs["settings"] = PredictorSettings(**tuned)
            info["settings"] = {"path": str(settings_path), **tuned}
        return cls(tlm=models.get("tlm"), sslm=models.get("sslm"), device=device, weights_info=info, **kwargs)

    def _inference_model(self, model: torch.nn.Module | None) -> torch.nn.Module | None:
        from dipid.models.inference import inference_copy

        if model is None:
            return None
        optimize = self.settings.optimize
        return inference_copy(model, device=self.device, fold_norms=optimize, channels_last=optimize)

    @property
    def available_models(self) -> tuple[str, ...]:
        """Models this predictor can run: a subset of ("tlm", "ssl", "joint", "classical")."""
        names = [n for n, m in (("tlm", self.tlm), ("ssl", self.sslm)) if m is not None]
        if names:
            names.append("joint")
        return (*names, "classical")

    def parameters_dict(self) -> dict[str, Any]:
        """Every setting that shaped a result, for provenance."""
        return {**asdict(self.settings), "device": str(self.device), "weights": self.weights_info}

    # ------------------------------------------------------------------ core, batched
    @torch.inference_mode()
    def predict_frames(
        self,
        counts: np.ndarray | torch.Tensor,
        *,
        bad_pixels: np.ndarray | None = None,
        frame_numbers: list[int] | None = None,
        use_tlm: bool = True,
        use_ssl: bool = True,
        use_classical: bool = False,
        use_nms: bool = False,
        keep_probability: bool = True,
    ) -> list[ImageResult]:
        """Predict a batch of frames.

        Args:
            counts: (B, H, W) counts with bad pixels already filled (float32 preferred).
            bad_pixels: (B, H, W) bool, pixels to exclude from metrics (kept on the results).
            frame_numbers: B frame numbers to record (default None each).
        Returns:
            B :class:`ImageResult` in input order.
        """
        from dipid.models.normalize import normalize_counts

        use_tlm = use_tlm and self._tlm_run is not None
        use_ssl = use_ssl and self._sslm_run is not None
        counts_t = torch.as_tensor(np.asarray(counts, dtype=np.float32) if not isinstance(counts, torch.Tensor) else counts)
        if counts_t.ndim == 2:
            counts_t = counts_t[None]
        batch, height, width = counts_t.shape
        shape = (height, width)
        frame_numbers = list(frame_numbers) if frame_numbers is not None else [None] * batch
        flags = dict(use_tlm=use_tlm, use_ssl=use_ssl, use_classical=use_classical, use_nms=use_nms)
        if max(height, width) > self.settings.tile_size:
            return [
                self._predict_tiled(counts_t[b].cpu().numpy(), None if bad_pixels is None else np.asarray(bad_pixels[b]),
                                    frame_numbers[b], keep_probability=keep_probability, **flags)
                for b in range(batch)
            ]
        timings: dict[str, float] = {}

        x = None
        if use_tlm or use_ssl:  # the networks' input; the classical finder works on counts
            t0 = time.perf_counter()
            x = normalize_counts(counts_t.to(self.device, non_blocking=True))[:, None]  # (B, 1, H, W)
            timings["normalize"] = time.perf_counter() - t0

        tlm_sets: list[Instances | None] = [None] * batch
        if use_tlm:
            t0 = time.perf_counter()
            with self._autocast():
                tlm_sets = self._run_tlm(x, shape, use_nms=use_nms)
            timings["tlm"] = time.perf_counter() - t0

        ssl_outputs: list[SSLOutput | None] = [None] * batch
        if use_ssl:
            t0 = time.perf_counter()
            with self._autocast():
                ssl_outputs = self._run_ssl(x, keep_probability=keep_probability)
            timings["ssl"] = time.perf_counter() - t0

        classical_sets: list[Instances | None] = [None] * batch
        # The classical finder also runs when joint fuses it in, but is reported only when asked for.
        classical_for_joint = self.settings.fusion_classical and use_tlm and use_ssl
        if use_classical or classical_for_joint:
            t0 = time.perf_counter()
            found = self.classical(counts_t.cpu().numpy(), bad_pixels)
            classical_sets = [Instances.from_masks(r.masks, r.scores, SOURCE_FLAGS["classical"]) for r in found]
            seconds = time.perf_counter() - t0
            if use_classical:
                timings["classical"] = seconds
            if classical_for_joint:
                timings["joint_classical"] = seconds  # joint's cost includes the finder it fuses in

        t0 = time.perf_counter()
        joint_sets = [
            self._fuse(tlm_sets[b], ssl_outputs[b], classical_sets[b], shape, use_nms=use_nms) for b in range(batch)
        ]
        if not use_classical:
            classical_sets = [None] * batch
        timings["fuse"] = time.perf_counter() - t0

        per_frame = {k: v / batch for k, v in timings.items()}
        return [
            ImageResult(
                frame=None if frame_numbers[b] is None else int(frame_numbers[b]),
                shape=shape,
                joint=joint_sets[b],
                tlm=tlm_sets[b],
                ssl=ssl_outputs[b],
                classical=classical_sets[b],
                bad_pixels=None if bad_pixels is None else np.asarray(bad_pixels[b], dtype=bool),
                timings=dict(per_frame),
            )
            for b in range(batch)
        ]

    def _autocast(self):
        """bf16 autocast on CUDA when ``settings.amp``; a no-op context otherwise."""
        enabled = self.settings.amp and self.device.type == "cuda"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _predict_tiled(
        self, counts: np.ndarray, bad: np.ndarray | None, frame: int | None, *, keep_probability: bool, **flags: bool
    ) -> ImageResult:
        """One large frame (H, W) in overlapping tiles; instances merged across tile borders."""
        from dipid.tiling import in_core, merge_tiled_instances, shift_instances, tile_grid

        shape = counts.shape
        tiles = tile_grid(shape, tile=self.settings.tile_size, overlap=self.settings.tile_overlap)
        found: dict[str, list[Instances]] = {"tlm": [], "ssl": [], "joint": [], "classical": []}
        probability = np.zeros(shape, np.float32) if flags["use_ssl"] and keep_probability else None
        timings: dict[str, float] = {}
        chunk = 8  # tiles per model call: memory is bounded by the tile batch, not the frame
        for start in range(0, len(tiles), chunk):
            group = tiles[start:start + chunk]
            tile_counts = np.stack([counts[t.slices] for t in group])
            tile_bad = None if bad is None else np.stack([bad[t.slices] for t in group])
            results = self.predict_frames(tile_counts, bad_pixels=tile_bad, keep_probability=probability is not None, **flags)
            for tile, res in zip(group, results):
                for kind in found:
                    if res.has(kind):
                        found[kind].append(shift_instances(in_core(res.instances(kind), tile), tile, shape))
                if probability is not None and res.ssl is not None:
                    region = probability[tile.slices]
                    np.maximum(region, res.ssl.probability, out=region)
                for k, v in res.timings.items():
                    timings[k] = timings.get(k, 0.0) + v
        merged = {k: merge_tiled_instances(v, shape) if v else None for k, v in found.items()}
        ssl = None
        if merged["ssl"] is not None:
            ssl = SSLOutput(probability=probability, mask=merged["ssl"].union_mask(), instances=merged["ssl"])
        return ImageResult(frame=frame, shape=shape, joint=merged["joint"] or Instances.empty(shape), tlm=merged["tlm"],
                           ssl=ssl, classical=merged["classical"], bad_pixels=bad, timings=timings)

    def _run_tlm(self, x: torch.Tensor, shape: tuple[int, int], *, use_nms: bool) -> list[Instances]:
        from dipid.postprocess import mask_nms

        s = self.settings
        outputs = self._tlm_run(x)
        results = []
        for out in outputs:
            keep = out["scores"] >= s.threshold
            masks = (out["masks"][keep, 0] >= s.mask_threshold).cpu().numpy()
            scores = out["scores"][keep].float().cpu().numpy()
            inst = Instances.from_masks(masks, scores, SOURCE_FLAGS["tlm"]).filter(min_area=s.min_area)
            if use_nms and len(inst) > 1:
                inst = inst[mask_nms(inst.masks, inst.scores, iou_threshold=s.nms_iou)]
            results.append(inst)
        return results

    def _run_ssl(self, x: torch.Tensor, *, keep_probability: bool) -> list[SSLOutput]:
        from dipid.postprocess import connected_instances

        sslm = self._sslm_run
        if getattr(sslm.config, "channel_roles", None) is None:
            from dipid.models.sslm import assign_channels

            logger.warning(
                "SSLM channels are not assigned to peak/background yet (untrained model): assigning them "
                "from this batch's statistics. Train with `dipid train sslm` to store an assignment."
            )
            sslm.config.channel_roles = assign_channels(sslm, x)
            self.sslm.config.channel_roles = list(sslm.config.channel_roles)
        probability = sslm.peak_probability(x).float()
        masks = (probability >= self.settings.ssl_threshold).cpu().numpy()
        probability_np = probability.cpu().numpy()
        outputs = []
        for b in range(len(masks)):
            comp_masks, comp_scores = connected_instances(
                masks[b], min_area=self.settings.min_area, probability=probability_np[b]
            )
            outputs.append(
                SSLOutput(
                    probability=probability_np[b] if keep_probability else None,
                    mask=masks[b],
                    instances=Instances.from_masks(comp_masks, comp_scores, SOURCE_FLAGS["ssl"]),
                )
            )
        return outputs

    def _fuse(
        self,
        tlm: Instances | None,
        ssl: SSLOutput | None,
        classical: Instances | None,
        shape: tuple[int, int],
        *,
        use_nms: bool,
    ) -> Instances:
        """The `joint` set: see :func:`dipid.postprocess.fuse_instances` for the rule."""
        from dipid.postprocess import fuse_instances, mask_nms

        s = self.settings
        if tlm is not None and ssl is not None:
            third = classical if s.fusion_classical and classical is not None else None
            masks, scores, sources = fuse_instances(
                tlm.masks, tlm.scores, ssl.instances.masks, ssl.instances.scores, **s.fusion_options(),
                classical_masks=None if third is None else third.masks,
                classical_scores=None if third is None else third.scores)
            return Instances.from_masks(masks, scores, sources)
        single = tlm if tlm is not None else (ssl.instances if ssl is not None else classical)
        if single is None:
            return Instances.empty(shape)
        if use_nms and len(single) > 1:
            single = single[mask_nms(single.masks, single.scores, iou_threshold=s.nms_iou)]
        return single

    # ------------------------------------------------------------------ the DiPID API
    def predict_one_image(
        self,
        scan_or_path: Any,
        img_no: int = 0,
        *,
        use_nms: bool = False,
        use_tlm: bool = True,
        use_ssl: bool = True,
        use_classical: bool = False,
    ) -> ImageResult:
        """Predict one frame of a scan (a :class:`dipid.io.Scan`, a path) or a 2D counts array.

        Returns:
            :class:`ImageResult` with ``tlm``, ``ssl``, ``joint`` (and ``classical``) instances.
        """
        counts, bad, frame = _one_frame(scan_or_path, img_no)
        return self.predict_frames(
            counts[None], bad_pixels=bad[None], frame_numbers=[frame], use_tlm=use_tlm, use_ssl=use_ssl,
            use_classical=use_classical, use_nms=use_nms,
        )[0]

    def predict_scan(
        self,
        scan_or_path: Any,
        *,
        start_val: int = 0,
        end_val: int | None = None,
        use_tlm: bool = True,
        use_ssl: bool = True,
        use_classical: bool = False,
        use_nms: bool = False,
        batch_size: int = 8,
        progress: bool | None = None,
    ) -> ScanResult:
        """Predict frames ``start_val`` .. ``end_val - 1`` of a scan (all by default).

        Frames are read in batches from the open file by a background thread while the models
        work. ``progress=None`` shows a bar for scans of more than 20 frames. NaN/inf pixels and
        frames that are all zero or have no good pixel give a :class:`dipid.errors.BadPixelWarning`
        (see :meth:`dipid.io.Scan.check_frames`).

        Raises:
            NoValidPixelsError: no pixel of any predicted frame holds a measurement.
        """
        from dipid.io import Scan, open_scan

        scan = scan_or_path if isinstance(scan_or_path, Scan) else open_scan(scan_or_path)
        n = len(scan)
        stop = n if end_val is None else min(int(end_val), n)
        start = max(int(start_val), 0)
        show = (stop - start > 20) if progress is None else progress
        frames: dict[int, ImageResult] = {}
        with tqdm(total=max(stop - start, 0), disable=not show, desc=Path(str(scan.path)).name, unit="frame") as bar:
            for batch in _prefetch(scan.iter_frames(start, stop, batch_size)):
                for result in self.predict_frames(
                    batch.frames, bad_pixels=batch.bad_pixels, frame_numbers=batch.indices.tolist(),
                    use_tlm=use_tlm, use_ssl=use_ssl, use_classical=use_classical, use_nms=use_nms,
                    keep_probability=False,
                ):
                    frames[result.frame] = result
                bar.update(len(batch.frames))
        scan.check_frames(start, stop)  # warnings about NaN / empty frames; NoValidPixelsError if nothing was measurable
        axis = scan.axis
        models = [m for m, on in (("tlm", use_tlm and self.tlm is not None), ("ssl", use_ssl and self.sslm is not None),
                                  ("classical", use_classical)) if on]
        return ScanResult(
            frames=frames,
            axis_name=axis.name,
            axis_values=np.asarray(axis.values, dtype=np.float64),
            frame_shape=tuple(scan.frame_shape),
            scan_path=str(scan.path),
            metadata={"scan": scan.metadata.to_dict(), "models": models, "parameters": self.parameters_dict()},
        )

    def generate_3d_plot(self, result: ScanResult, scan_type: str = "joint"):
        """Plotly Figure of the stacked mask volume (see :func:`dipid.viz.generate_3d_plot`)."""
        from dipid.viz import generate_3d_plot

        return generate_3d_plot(result, scan_type=scan_type)

    def show_image_predictions(self, scan_or_path: Any, img_no: int = 0, *, model: str = "joint", **kwargs: Any):
        """Predict one frame and return a plotly Figure: linear and log views with the masks overlaid."""
        from dipid.viz import show_image_predictions

        counts, _, frame = _one_frame(scan_or_path, img_no)
        result = self.predict_one_image(counts, **kwargs)
        result.frame = frame
        return show_image_predictions(counts, result, model=model)


def _one_frame(scan_or_path: Any, img_no: int) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(counts (H, W) float32 filled, bad pixels (H, W) bool, frame number or None)."""
    from dipid.io import Scan, fill_bad_pixels, open_scan

    if isinstance(scan_or_path, (np.ndarray, torch.Tensor)):
        raw = np.asarray(scan_or_path, dtype=np.float32)
        if raw.ndim == 3:
            raw, frame = raw[img_no], img_no
        elif raw.ndim == 2:
            frame = None
        else:
            raise DipidError(f"a frame array must be (H, W) or (F, H, W), got shape {raw.shape}")
        bad = raw < 0
        return (fill_bad_pixels(raw, bad) if bad.any() else raw), bad, frame
    scan = scan_or_path if isinstance(scan_or_path, Scan) else open_scan(scan_or_path)
    counts, bad = scan.read_frames([img_no])
    return counts[0], bad[0], img_no if img_no >= 0 else len(scan) + img_no


def _prefetch(iterator: Iterator, depth: int = 2) -> Iterator:
    """Run ``iterator`` in a background thread, ``depth`` items ahead (h5py reads release the GIL)."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def worker() -> None:
        try:
            for item in iterator:
                items.put(item)
        except BaseException as exc:  # handed to the consumer, raised there
            items.put(exc)
        finally:
            items.put(done)

    thread = threading.Thread(target=worker, daemon=True, name="dipid-reader")
    thread.start()
    while True:
        item = items.get()
        if item is done:
            break
        if isinstance(item, BaseException):
            raise item
        yield item
    thread.join()


def read_settings(path: str | Path) -> dict[str, Any]:
    """The :class:`PredictorSettings` fields in a JSON file (an object of name: value).

    Raises:
        DipidError: not a JSON object, or a name that is not a setting (the valid ones listed).
    """
    import json
    from dataclasses import fields

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DipidError(f"{path}: cannot be read as JSON ({exc}); fix or delete the file.") from exc
    valid = {f.name: f.type for f in fields(PredictorSettings)}
    if not isinstance(data, dict):
        raise DipidError(f"{path}: must hold a JSON object of predictor settings, not {type(data).__name__}.")
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise DipidError(f"{path}: unknown predictor setting(s) {', '.join(unknown)}; valid: {', '.join(valid)}.")
    return dict(data)


def _read_sha256sums(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    sums = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            sums[parts[1].lstrip("*")] = parts[0].lower()
    return sums
