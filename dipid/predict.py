"""The JointPredictor: runs the TLM and SSLM (and the classical finder) on frames and scans.

Input contract: frames are detector counts, (H, W) or (B, H, W), any real dtype; bad pixels are
negative or listed in a mask and are filled from their neighbours before the networks see them
(:class:`dipid.io.Scan` does this when reading). Everything returned is numpy on the CPU, in the
result objects of :mod:`dipid.results`.

This module orchestrates; the pieces live elsewhere: finding and checking checkpoints in
:mod:`dipid.models.weights`, the models' inference copies in :mod:`dipid.models.inference`,
turning model outputs into instances (and fusing them) in :mod:`dipid.decode`, tiles in
:mod:`dipid.tiling`. Which models run is one argument, ``models=`` (see :func:`select_models`).
"""

from __future__ import annotations

import copy
import json
import logging
import queue
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from tqdm.auto import tqdm

from dipid._memory import release_free_heap
from dipid.classical import ClassicalFinder
from dipid.decode import classical_instances, joint_instances, ssl_output, tlm_instances
from dipid.errors import DipidError, UnknownNameError
from dipid.io import Scan, fill_bad_pixels, open_scan
from dipid.postprocess import FUSION_ANCHORS, fusion_keeps_only_candidates
from dipid.results import (
    MODEL_KINDS,
    ImageResult,
    Instances,
    ScanResult,
    SSLOutput,
    check_model,
)
from dipid.tiling import (
    Tile,
    in_core,
    merge_tiled_instances,
    peak_windows,
    shift_instances,
    tile_grid,
    window_instances,
)

if TYPE_CHECKING:  # annotations only: torch (and dipid.models, which loads torchvision) is imported
    # where a network is built, loaded or run, so classical-only prediction never pays for it
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "JointPredictor",
    "PredictorSettings",
    "MODEL_NAMES",
    "DEFAULT_MODELS",
    "select_models",
    "read_settings",
    "ImageResult",
    "ScanResult",
    "Instances",
]

#: What ``models=`` may name. "joint", the fusion of the two networks, stands for "tlm" and "ssl".
MODEL_NAMES = MODEL_KINDS
#: What runs when ``models=None``: both networks (so `joint` is their fusion), not the classical finder.
DEFAULT_MODELS = ("tlm", "ssl")
#: The models a prediction runs, in the order they run.
_RUNNABLE = ("tlm", "ssl", "classical")

_T = TypeVar("_T")


def select_models(models: str | Iterable[str] | None = None) -> tuple[str, ...]:
    """The models ``models=`` asks to run: a subset of ("tlm", "ssl", "classical"), in that order.

    Args:
        models: names from :data:`MODEL_NAMES` (one name or several; "joint" means "tlm" and
            "ssl"); None: :data:`DEFAULT_MODELS`.
    Raises:
        UnknownNameError: a name that is not a model (the valid ones listed).
    """
    if models is None:
        return DEFAULT_MODELS
    names = (models,) if isinstance(models, str) else tuple(models)
    chosen: set[str] = set()
    for name in names:
        check_model(name)
        chosen.update(("tlm", "ssl") if name == "joint" else (name,))
    return tuple(name for name in _RUNNABLE if name in chosen)


#: RSS growth (bytes) after which predict_scan hands the C heap's free pages back (dipid._memory)
_TRIM_AFTER_GROWTH = 256 * 2**20


@dataclass(frozen=True)
class PredictorSettings:
    """Thresholds of the JointPredictor (all recorded with every result).

    Attributes:
        threshold: minimum TLM instance confidence kept, in [0, 1].
        mask_threshold: TLM per-pixel mask probability that counts as peak.
        ssl_threshold: SSLM per-pixel peak probability that counts as peak.
        min_area: smallest instance kept, pixels.
        nms: run mask NMS on the TLM's instances, and on `joint` when only one model makes it
            (both networks' `joint` is de-duplicated by the fusion itself, at ``nms_iou``).
        nms_iou: mask IoU above which the lower-scored of two instances is dropped (by NMS, and
            inside the fusion).
        fusion_anchor: whose instances are `joint`'s candidates, the other detectors confirming
            them: "tlm", or "classical" (the networks vouch for, rank and complete the classical
            finder's peaks; needs ``fusion_classical``). See :func:`dipid.postprocess.fuse_instances`.
        fusion_match_iou: IoU at which a piece of evidence confirms a candidate.
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
        fusion_add_agreeing: whether an SSLM component and a classical peak that agree, with no
            TLM instance, join `joint` as one instance (with the TLM's and each source's lone
            instances kept out, `joint` is a two-of-three vote; see
            :func:`dipid.postprocess.fuse_instances`, step 5). Needs ``fusion_classical``.
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
        classical_gate: when `joint` is computed, run the networks only on frames (and, on large
            frames, tiles) where the classical finder finds a peak; elsewhere ``tlm`` and ``ssl``
            are None ("not run") and `joint` is empty. `joint` is the same as without the gate,
            because the fusion keeps only classical peaks (needs ``fusion_anchor="classical"``
            and a fusion that adds none of the networks' own peaks, see
            :func:`dipid.postprocess.fusion_keeps_only_candidates`); the networks' time on
            empty frames is saved. The TLM and SSLM rows of gated frames are then not theirs to
            judge: turn it off to study the networks alone.
        peak_windows: with ``classical_gate``, the networks see only windows around the classical
            peaks instead of whole frames: each peak's box grown by this many pixels and snapped
            to the 32-pixel grid of the TLM's coarsest stride, overlapping windows merged
            (:func:`dipid.tiling.peak_windows`); frames are normalised whole first, so a window's
            background is the frame's. `joint` keeps only classical peaks, so only the networks'
            view of those peaks matters to it; the margin is the context they get. Unlike the
            gate this can change `joint` slightly (a network sees less around a peak), which is
            why it is a measured setting (``benchmarks/accuracy.py``). None: whole frames.
    """

    threshold: float = 0.4
    mask_threshold: float = 0.5
    ssl_threshold: float = 0.5
    min_area: int = 4
    nms: bool = False
    nms_iou: float = 0.5
    fusion_anchor: str = "tlm"
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
    fusion_add_agreeing: bool = False
    tile_size: int = 512
    tile_overlap: int = 64
    amp: bool = True
    optimize: bool = True
    proposals: int | None = None
    classical_gate: bool = False
    peak_windows: int | None = None

    def __post_init__(self) -> None:
        if self.fusion_anchor not in FUSION_ANCHORS:
            raise UnknownNameError("fusion anchor", self.fusion_anchor, FUSION_ANCHORS)
        if self.fusion_anchor == "classical" and not self.fusion_classical:
            raise DipidError("fusion_anchor='classical' needs fusion_classical=True (the classical finder must run)")
        if self.classical_gate and not (self.fusion_anchor == "classical"
                                        and fusion_keeps_only_candidates(**self.fusion_options())):
            raise DipidError(
                "classical_gate=True would change `joint`: it needs fusion_anchor='classical' and a fusion that "
                "adds no peak of the networks' own (fusion_add_unmatched_ssl=False, fusion_add_agreeing=False, "
                "fusion_tlm_min_score > 1); set classical_gate=False or change those settings")
        if self.peak_windows is not None and (not self.classical_gate or self.peak_windows < 0):
            raise DipidError(
                f"peak_windows={self.peak_windows} needs classical_gate=True (the windows are around the classical "
                "peaks `joint` keeps) and a margin >= 0 pixels; set peak_windows=None to run the networks on whole "
                "frames")

    def fusion_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`dipid.postprocess.fuse_instances` these settings give."""
        return dict(
            anchor=self.fusion_anchor, match_iou=self.fusion_match_iou, tlm_min_score=self.fusion_tlm_min_score,
            ssl_min_score=self.fusion_ssl_min_score, ssl_min_area=self.fusion_ssl_min_area,
            add_unmatched_ssl=self.fusion_add_unmatched_ssl, refine_with_ssl=self.fusion_refine_with_ssl,
            refine_margin=self.fusion_refine_margin, nms_iou=self.nms_iou,
            classical_min_score=self.fusion_classical_min_score, classical_min_area=self.fusion_classical_min_area,
            add_unmatched_classical=self.fusion_add_unmatched_classical,
            refine_with_classical=self.fusion_refine_with_classical,
            add_agreeing_evidence=self.fusion_add_agreeing,
        )


class JointPredictor:
    """Runs the TLM (Mask R-CNN) and the SSLM on detector frames and fuses their peaks.

    ``JointPredictor(tlm=build_tlm(), sslm=build_sslm())`` makes an untrained predictor;
    ``JointPredictor.from_pretrained()`` loads the weights shipped in ``weights/``.

    The models given are never modified (they may still be trained or saved): the predictor runs
    its own eval-mode inference copies on its device (see ``PredictorSettings.optimize``), and
    whatever a prediction sets up (e.g. the channel roles of an untrained SSLM) stays on them.

    A predictor without networks (``JointPredictor()``, the classical finder only) never imports
    torch: it works on numpy arrays.
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
        base = settings or PredictorSettings()
        self.settings = PredictorSettings(**{**asdict(base), "threshold": threshold if settings is None else base.threshold})
        self.tlm = tlm
        self.sslm = sslm
        # What was asked for; resolved (torch imported) now when a network is given, else on
        # first use of `device` only: the classical finder is NumPy and needs no device.
        self._device_request = device
        self._device: torch.device | None = None
        self._tlm_run = self._sslm_run = None
        if tlm is not None or sslm is not None:
            # torch, torchvision: only a predictor with networks loads them
            from dipid.models.device import resolve_device
            from dipid.models.inference import inference_copy

            self._device = resolve_device(device)
            optimize = self.settings.optimize
            self._tlm_run = None if tlm is None else inference_copy(
                tlm, device=self._device, fold_norms=optimize, channels_last=optimize,
                min_score=self.settings.threshold, proposals=self.settings.proposals)
            self._sslm_run = None if sslm is None else inference_copy(
                sslm, device=self._device, fold_norms=optimize, channels_last=optimize)
        self.classical = classical if classical is not None else ClassicalFinder()
        self.weights_info = dict(weights_info or {})

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls, path_or_name: str | Path | None = None, *, device: str | torch.device = "auto", **kwargs: Any
    ) -> "JointPredictor":
        """Load checkpoints: none -> the shipped ``weights/``; a folder holding ``tlm.safetensors``
        and/or ``sslm.safetensors`` (or a training run folder with ``best.safetensors``); or one
        checkpoint file (see :mod:`dipid.models.weights`). Shipped weights are checked against
        ``weights/SHA256SUMS``.

        A ``settings.json`` in the folder (settings tuned for these checkpoints) is the starting
        point of the predictor's settings unless ``settings=`` is given; ``threshold=`` still wins.

        Raises:
            WeightsNotFoundError: nothing loadable there (the message says how to get weights), or
                a checkpoint that does not match its sha256 sum.
            DipidError: ``settings.json`` is not a JSON object of known settings.
        """
        # torch: checkpoints load into networks
        from dipid.models.weights import load_weights

        weights = load_weights(path_or_name)
        info: dict[str, Any] = dict(weights.info)
        if weights.settings_file is not None and kwargs.get("settings") is None:
            tuned = read_settings(weights.settings_file)
            if "threshold" in kwargs:
                tuned["threshold"] = float(kwargs.pop("threshold"))
            kwargs["settings"] = PredictorSettings(**tuned)
            info["settings"] = {"path": str(weights.settings_file), **tuned}
        return cls(tlm=weights.models.get("tlm"), sslm=weights.models.get("sslm"), device=device,
                   weights_info=info, **kwargs)

    def with_settings(self, **changes: Any) -> "JointPredictor":
        """This predictor with some :class:`PredictorSettings` changed, e.g.
        ``with_settings(classical_gate=False)``. The models are shared, and so are their inference
        copies unless a change shapes them (``threshold``, ``proposals``, ``optimize``).

        Raises:
            UnknownNameError: a name that is not a setting (the valid ones listed).
        """
        valid = [f.name for f in fields(PredictorSettings)]
        for name in changes:
            if name not in valid:
                raise UnknownNameError("predictor setting", name, valid)
        settings = replace(self.settings, **changes)
        if any(getattr(settings, name) != getattr(self.settings, name) for name in ("threshold", "proposals", "optimize")):
            device = self._device if self._device is not None else self._device_request
            return JointPredictor(tlm=self.tlm, sslm=self.sslm, classical=self.classical, device=device,
                                  settings=settings, weights_info=self.weights_info)
        twin = copy.copy(self)
        twin.settings = settings
        return twin

    @property
    def device(self) -> torch.device:
        """The torch device the networks run on. A classical-only predictor resolves the
        ``device=`` it was given (importing torch) only when this is asked for."""
        if self._device is None:
            # torch: asked for on a classical-only predictor
            from dipid.models.device import resolve_device

            self._device = resolve_device(self._device_request)
        return self._device

    @property
    def available_models(self) -> tuple[str, ...]:
        """Models this predictor can run: a subset of ("tlm", "ssl", "joint", "classical")."""
        names = [n for n, m in (("tlm", self.tlm), ("ssl", self.sslm)) if m is not None]
        if names:
            names.append("joint")
        return (*names, "classical")

    def parameters_dict(self) -> dict[str, Any]:
        """Every setting that shaped a result, for provenance."""
        # Without networks only the classical finder ran, NumPy on the CPU whatever device was asked for.
        device = str(self.device) if self._tlm_run is not None or self._sslm_run is not None else "cpu"
        return {**asdict(self.settings), "device": device, "weights": self.weights_info}

    def _runnable(self, models: str | Iterable[str] | None) -> tuple[str, ...]:
        """:func:`select_models`, less the networks this predictor does not hold."""
        present = {"tlm": self._tlm_run is not None, "ssl": self._sslm_run is not None, "classical": True}
        return tuple(name for name in select_models(models) if present[name])

    # ------------------------------------------------------------------ core, batched
    def predict_frames(
        self,
        counts: np.ndarray | torch.Tensor,
        *,
        bad_pixels: np.ndarray | None = None,
        frame_numbers: list[int] | None = None,
        models: str | Iterable[str] | None = None,
        keep_probability: bool = True,
    ) -> list[ImageResult]:
        """Predict a batch of frames.

        Args:
            counts: (B, H, W) counts with bad pixels already filled (float32 preferred): a numpy
                array (made a torch tensor only for the networks) or a torch tensor.
            bad_pixels: (B, H, W) bool, pixels to exclude from metrics (kept on the results).
            frame_numbers: B frame numbers to record (default None each).
            models: which models run (see :func:`select_models`; default tlm and ssl); a network
                this predictor does not hold is skipped.
            keep_probability: keep the SSLM's (H, W) probability map on each result.
        Returns:
            B :class:`ImageResult` in input order.
        Raises:
            UnknownNameError: ``models`` names something that is not a model.
        """
        if not _is_tensor(counts):
            counts = np.asarray(counts, dtype=np.float32)
        if counts.ndim == 2:
            counts = counts[None]
        numbers = list(frame_numbers) if frame_numbers is not None else [None] * len(counts)
        return self._predict(counts, bad_pixels, numbers, self._runnable(models), keep_probability=keep_probability)

    def _predict(
        self,
        counts: np.ndarray | torch.Tensor,
        bad_pixels: np.ndarray | None,
        frame_numbers: list[int | None],
        run: tuple[str, ...],
        *,
        keep_probability: bool,
        classical_sets: list[Instances] | None = None,
    ) -> list[ImageResult]:
        """predict_frames with the models to run already resolved: (B, H, W) counts (float32
        numpy, or a torch tensor) -> B results.

        ``classical_sets``: the B frames' classical peaks when the caller found them already (a
        large frame's tiles get the peaks found once on the whole frame); else the finder runs
        here when asked for or fused into `joint`.
        """
        batch, height, width = counts.shape
        shape = (height, width)
        # Only the networks need tiles (their memory grows with the image); the classical finder
        # is whole-frame NumPy and runs on whole frames (see _predict_tiled).
        if max(height, width) > self.settings.tile_size and ("tlm" in run or "ssl" in run):
            return [
                self._predict_tiled(_numpy(counts[b]), None if bad_pixels is None else np.asarray(bad_pixels[b]),
                                    frame_numbers[b], run, keep_probability=keep_probability)
                for b in range(batch)
            ]
        s = self.settings
        nms_iou = s.nms_iou if s.nms else None
        timings: dict[str, float] = {}

        # The classical finder also runs when joint fuses it in, but is reported only when asked
        # for. It runs first: with the gate, its peaks say which frames the networks see.
        report_classical = "classical" in run
        classical_for_joint = self._classical_for_joint(run)
        if classical_sets is None and (report_classical or classical_for_joint):
            t0 = time.perf_counter()
            classical_sets = [classical_instances(r) for r in self.classical(_numpy(counts), bad_pixels)]
            seconds = time.perf_counter() - t0
            if report_classical:
                timings["classical"] = seconds
            if classical_for_joint:
                timings["joint_classical"] = seconds  # joint's cost includes the finder it fuses in
        found = classical_sets if classical_sets is not None else [None] * batch

        seen = list(range(batch))  # the frames the networks run on
        if s.classical_gate and classical_for_joint:
            seen = [b for b in seen if len(found[b])]

        tlm_sets: list[Instances | None] = [None] * batch
        ssl_outputs: list[SSLOutput | None] = [None] * batch
        if seen and ("tlm" in run or "ssl" in run):
            # torch, torchvision: only the networks need them (a predictor holding one has loaded them)
            import torch

            from dipid.models.normalize import normalize_counts

            with torch.inference_mode():
                t0 = time.perf_counter()
                picked = torch.as_tensor(counts if len(seen) == batch else counts[seen])
                x = normalize_counts(picked.to(self.device, non_blocking=True))[:, None]  # (B', 1, H, W)
                timings["normalize"] = time.perf_counter() - t0
                # the windows each frame's networks see (None: the whole frame)
                windows = None
                if s.peak_windows is not None and classical_for_joint:
                    windows = [peak_windows(found[b].boxes, shape, margin=s.peak_windows) for b in seen]
                if "tlm" in run:
                    t0 = time.perf_counter()
                    with self._autocast():
                        if windows is None:
                            for b, out in zip(seen, self._tlm_run(x)):
                                tlm_sets[b] = self._tlm_decode(out)
                        else:
                            outs = _run_in_windows(self._tlm_run, x, windows)
                            for b, frame_windows, frame_outs in zip(seen, windows, outs):
                                tlm_sets[b] = merge_tiled_instances(
                                    [shift_instances(self._tlm_decode(out), w, shape)
                                     for w, out in zip(frame_windows, frame_outs)], shape)
                    timings["tlm"] = time.perf_counter() - t0
                if "ssl" in run:
                    t0 = time.perf_counter()
                    with self._autocast():
                        if windows is None:
                            probability = self._ssl_probability(x).cpu().numpy()
                        else:
                            # outside the windows the SSLM did not look: probability 0 there
                            probability = np.zeros((len(seen), height, width), np.float32)
                            outs = _run_in_windows(self._ssl_probability, x, windows)
                            for frame_probability, frame_windows, frame_outs in zip(probability, windows, outs):
                                for w, out in zip(frame_windows, frame_outs):
                                    frame_probability[w.slices] = out.cpu().numpy()
                        for b, p in zip(seen, probability):
                            ssl_outputs[b] = ssl_output(p, threshold=s.ssl_threshold, min_area=s.min_area,
                                                        keep_probability=keep_probability)
                    timings["ssl"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        fusion = s.fusion_options()
        # A gated frame has no network output and no classical peak: its joint is that empty set.
        joint_sets = [
            joint_instances(tlm_sets[b], ssl_outputs[b], found[b], shape, fusion=fusion,
                            classical_evidence=s.fusion_classical, nms_iou=nms_iou)
            for b in range(batch)
        ]
        timings["fuse"] = time.perf_counter() - t0

        per_frame = {k: v / batch for k, v in timings.items()}
        return [
            ImageResult(
                frame=None if frame_numbers[b] is None else int(frame_numbers[b]),
                shape=shape,
                joint=joint_sets[b],
                tlm=tlm_sets[b],
                ssl=ssl_outputs[b],
                classical=found[b] if report_classical else None,
                bad_pixels=None if bad_pixels is None else np.asarray(bad_pixels[b], dtype=bool),
                timings=dict(per_frame),
            )
            for b in range(batch)
        ]

    def _tlm_decode(self, output: dict[str, Any]) -> Instances:
        """One image's TLM output -> its instances, with these settings' thresholds."""
        s = self.settings
        return tlm_instances(output, threshold=s.threshold, mask_threshold=s.mask_threshold, min_area=s.min_area,
                             nms_iou=s.nms_iou if s.nms else None)

    def _classical_for_joint(self, run: tuple[str, ...]) -> bool:
        """Whether `joint` fuses the classical finder's peaks in this run (both networks run and
        ``fusion_classical`` is set): then the finder runs even when its peaks are not reported."""
        return self.settings.fusion_classical and "tlm" in run and "ssl" in run

    def _autocast(self):
        """bf16 autocast on CUDA when ``settings.amp``; a no-op context otherwise."""
        import torch  # only called where a network runs

        enabled = self.settings.amp and self.device.type == "cuda"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _ssl_probability(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) network input -> (B, H, W) float32 SSLM peak probability."""
        # torch: only called where the SSLM runs
        from dipid.models.sslm import assign_channels

        sslm = self._sslm_run
        if sslm.config.channel_roles is None:
            logger.warning(
                "SSLM channels are not assigned to peak/background yet (untrained model): assigning them "
                "from this batch's statistics. Train with `dipid train sslm` to store an assignment."
            )
            # Stored on the inference copy only (later batches reuse it); the model given keeps its config.
            assign_channels(sslm, x)
        return sslm.peak_probability(x).float()

    def _predict_tiled(
        self, counts: np.ndarray, bad: np.ndarray | None, frame: int | None, run: tuple[str, ...], *,
        keep_probability: bool,
    ) -> ImageResult:
        """One large frame (H, W): the networks in overlapping tiles, instances merged across tile
        borders. The classical finder runs once, on the whole frame: its peaks are reported, and
        each tile's part of them is what that tile's `joint` fuses (and, with the gate, whether
        the networks run on the tile at all: an empty tile costs nothing)."""
        shape = counts.shape
        s = self.settings
        classical_for_joint = self._classical_for_joint(run)
        timings: dict[str, float] = {}
        report_classical = "classical" in run
        whole: Instances | None = None
        if report_classical or classical_for_joint:
            t0 = time.perf_counter()
            whole = classical_instances(self.classical(counts[None], None if bad is None else bad[None])[0])
            timings["classical" if report_classical else "joint_classical"] = time.perf_counter() - t0
        run = tuple(name for name in run if name != "classical")
        tiles = tile_grid(shape, tile=s.tile_size, overlap=s.tile_overlap)
        tile_peaks = [window_instances(whole, t) for t in tiles] if classical_for_joint else None
        if tile_peaks is not None and s.classical_gate:
            kept = [k for k, peaks in enumerate(tile_peaks) if len(peaks)]
            tiles, tile_peaks = [tiles[k] for k in kept], [tile_peaks[k] for k in kept]
        found: dict[str, list[Instances]] = {"tlm": [], "ssl": [], "joint": []}
        probability = np.zeros(shape, np.float32) if "ssl" in run and keep_probability else None
        chunk = 8  # tiles per model call: memory is bounded by the tile batch, not the frame
        for start in range(0, len(tiles), chunk):
            group = tiles[start:start + chunk]
            tile_counts = np.stack([counts[t.slices] for t in group])
            tile_bad = None if bad is None else np.stack([bad[t.slices] for t in group])
            results = self._predict(tile_counts, tile_bad, [None] * len(group), run,
                                    keep_probability=probability is not None,
                                    classical_sets=None if tile_peaks is None else tile_peaks[start:start + chunk])
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
                           ssl=ssl, classical=whole if report_classical else None,
                           bad_pixels=bad, timings=timings)

    # ------------------------------------------------------------------ the DiPID API
    def predict_one_image(
        self, scan_or_path: Any, img_no: int = 0, *, models: str | Iterable[str] | None = None
    ) -> ImageResult:
        """Predict one frame of a scan (a :class:`dipid.io.Scan`, a path) or a 2D counts array.

        A scan opened here from a path is closed before returning. ``models``: see
        :meth:`predict_frames`.

        Returns:
            :class:`ImageResult` with ``tlm``, ``ssl``, ``joint`` (and ``classical``) instances.
        """
        counts, bad, frame = _one_frame(scan_or_path, img_no)
        return self.predict_frames(counts[None], bad_pixels=bad[None], frame_numbers=[frame], models=models)[0]

    def predict_scan(
        self,
        scan_or_path: Any,
        *,
        start_val: int = 0,
        end_val: int | None = None,
        models: str | Iterable[str] | None = None,
        batch_size: int = 8,
        progress: bool | None = None,
    ) -> ScanResult:
        """Predict frames ``start_val`` .. ``end_val - 1`` of a scan (all by default).

        Frames are read in batches by a background thread while the models work. A scan given as
        a path is opened here and closed before this returns (on an error too); a :class:`Scan`
        given stays open, it is the caller's. ``models``: see :meth:`predict_frames`.
        ``progress=None`` shows a bar for scans of more than 20 frames. NaN/inf pixels and frames
        that are all zero or have no good pixel give a :class:`dipid.errors.BadPixelWarning` (see
        :meth:`dipid.io.Scan.check_frames`). Memory: per frame the result keeps its cropped
        instances; frames with the same bad-pixel mask share one read-only array.

        Raises:
            NoValidPixelsError: no pixel of any predicted frame holds a measurement.
            UnknownNameError: ``models`` names something that is not a model.
        """
        run = self._runnable(models)  # a bad name fails before a file is opened
        if isinstance(scan_or_path, Scan):
            return self._predict_scan(scan_or_path, start_val, end_val, run, batch_size=batch_size, progress=progress)
        with open_scan(scan_or_path) as scan:
            return self._predict_scan(scan, start_val, end_val, run, batch_size=batch_size, progress=progress)

    def _predict_scan(
        self, scan: Scan, start_val: int, end_val: int | None, run: tuple[str, ...], *, batch_size: int,
        progress: bool | None,
    ) -> ScanResult:
        n = len(scan)
        stop = n if end_val is None else min(int(end_val), n)
        start = max(int(start_val), 0)
        show = (stop - start > 20) if progress is None else progress
        frames: dict[int, ImageResult] = {}
        networks_run = "tlm" in run or "ssl" in run
        # Per frame only the cropped instances grow with the scan; the one full-frame array a
        # result holds, its bad-pixel mask, is mostly the detector's and the same in every frame:
        # frames whose mask equals the previous distinct one share it (a long Eiger 4M scan would
        # otherwise hold 4.5 MB a frame).
        shared: np.ndarray | None = None
        with (tqdm(total=max(stop - start, 0), disable=not show, desc=Path(str(scan.path)).name, unit="frame") as bar,
              closing(_prefetch(scan.iter_frames(start, stop, batch_size))) as batches):
            for batch in batches:
                for result in self.predict_frames(batch.frames, bad_pixels=batch.bad_pixels,
                                                  frame_numbers=batch.indices.tolist(), models=run,
                                                  keep_probability=False):
                    if result.bad_pixels is not None:
                        if shared is None or not np.array_equal(result.bad_pixels, shared):
                            shared = result.bad_pixels.copy()  # not a view that keeps the batch alive
                            shared.flags.writeable = False  # shared between frames: no one frame's to change
                        result.bad_pixels = shared
                    frames[result.frame] = result
                if networks_run:  # their buffers change size from batch to batch (see dipid._memory)
                    release_free_heap(min_rss_growth=_TRIM_AFTER_GROWTH)
                bar.update(len(batch.frames))
        scan.check_frames(start, stop)  # warnings about NaN / empty frames; NoValidPixelsError if nothing was measurable
        axis = scan.axis
        metadata = {"scan": scan.metadata.to_dict(), "models": list(run), "parameters": self.parameters_dict()}
        networks = [name for name in ("tlm", "ssl") if name in run]
        gated = [number for number, result in frames.items() if networks and not result.has(networks[0])]
        if gated:  # said in the result (and its NeXus file): their tlm/ssl rows are "not run", not "nothing found"
            metadata["networks_not_run"] = {"frames": gated, "why": "classical_gate: the classical finder found no peak"}
            logger.info("%s: the networks ran on %d of %d frames (classical_gate: no classical peak on the others)",
                        Path(str(scan.path)).name, len(frames) - len(gated), len(frames))
        if networks and self.settings.peak_windows is not None and self._classical_for_joint(run):
            metadata["networks_windows"] = {
                "margin": self.settings.peak_windows,
                "why": "peak_windows: the networks saw only windows around the classical peaks"}
        return ScanResult(
            frames=frames,
            axis_name=axis.name,
            axis_values=np.asarray(axis.values, dtype=np.float64),
            frame_shape=tuple(scan.frame_shape),
            scan_path=str(scan.path),
            metadata=metadata,
        )

    def generate_3d_plot(self, result: ScanResult, scan_type: str = "joint"):
        """Plotly Figure of the stacked mask volume (see :func:`dipid.viz.generate_3d_plot`)."""
        # plotly: imported only when a figure is made
        from dipid.viz import generate_3d_plot

        return generate_3d_plot(result, scan_type=scan_type)

    def show_image_predictions(
        self, scan_or_path: Any, img_no: int = 0, *, model: str = "joint", models: str | Iterable[str] | None = None
    ):
        """Predict one frame and return a plotly Figure: linear and log views with ``model``'s masks overlaid."""
        # plotly: imported only when a figure is made
        from dipid.viz import show_image_predictions

        counts, bad, frame = _one_frame(scan_or_path, img_no)
        result = self.predict_frames(counts[None], bad_pixels=bad[None], frame_numbers=[frame], models=models)[0]
        return show_image_predictions(counts, result, model=model)


def _one_frame(scan_or_path: Any, img_no: int) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(counts (H, W) float32 filled, bad pixels (H, W) bool, frame number or None); a scan
    opened here from a path is closed again."""
    if isinstance(scan_or_path, np.ndarray) or _is_tensor(scan_or_path):
        raw = np.asarray(scan_or_path, dtype=np.float32)
        if raw.ndim == 3:
            raw, frame = raw[img_no], img_no
        elif raw.ndim == 2:
            frame = None
        else:
            raise DipidError(f"a frame array must be (H, W) or (F, H, W), got shape {raw.shape}")
        bad = raw < 0
        return (fill_bad_pixels(raw, bad) if bad.any() else raw), bad, frame
    if isinstance(scan_or_path, Scan):
        return _read_one(scan_or_path, img_no)
    with open_scan(scan_or_path) as scan:
        return _read_one(scan, img_no)


def _is_tensor(value: Any) -> bool:
    """Whether ``value`` is a torch tensor, without importing torch (a tensor means it is loaded)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _numpy(counts: np.ndarray | torch.Tensor) -> np.ndarray:
    """``counts`` as a numpy array on the CPU (a tensor is copied off its device, numpy as it is).
    Detached: outside inference mode a tensor that requires grad has no numpy view otherwise."""
    return counts.detach().cpu().numpy() if _is_tensor(counts) else counts


def _run_in_windows(network: Any, x: torch.Tensor, windows: list[list[Tile]]) -> list[list[Any]]:
    """``network`` on windows of a batch: x (B, 1, H, W) and B lists of windows -> B lists of its
    outputs, one per window. Windows of one shape go through the network as one batch."""
    import torch  # only called where a network runs

    by_shape: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i, frame_windows in enumerate(windows):
        for k, w in enumerate(frame_windows):
            by_shape.setdefault(w.shape, []).append((i, k))
    outs: list[list[Any]] = [[None] * len(frame_windows) for frame_windows in windows]
    for members in by_shape.values():
        crops = torch.stack([x[i][(slice(None), *windows[i][k].slices)] for i, k in members])
        for (i, k), out in zip(members, network(crops)):
            outs[i][k] = out
    return outs


def _read_one(scan: Scan, img_no: int) -> tuple[np.ndarray, np.ndarray, int]:
    counts, bad = scan.read_frames([img_no])
    return counts[0], bad[0], img_no if img_no >= 0 else len(scan) + img_no


def _prefetch(iterator: Iterator[_T], depth: int = 2) -> Iterator[_T]:
    """Run ``iterator`` in a background thread, ``depth`` items ahead (h5py reads release the GIL).

    Close the generator to stop early (``contextlib.closing``; on an error in the consumer too):
    the thread stops reading, closes ``iterator`` and has ended when ``close()`` returns, so the
    file it read can be closed next.
    """
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def worker() -> None:
        try:
            for item in iterator:
                items.put(item)
                if stop.is_set():
                    break
        except BaseException as exc:  # handed to the consumer, raised there
            items.put(exc)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
            items.put(done)

    thread = threading.Thread(target=worker, daemon=True, name="dipid-reader")
    thread.start()
    try:
        while True:
            item = items.get()
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # take what it still puts, so a worker waiting on a full queue goes on
            try:
                items.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


def read_settings(path: str | Path) -> dict[str, Any]:
    """The :class:`PredictorSettings` fields in a JSON file (an object of name: value).

    Raises:
        DipidError: not a JSON object, or a name that is not a setting (the valid ones listed).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DipidError(f"{path}: cannot be read as JSON ({exc}); fix or delete the file.") from exc
    valid = [f.name for f in fields(PredictorSettings)]
    if not isinstance(data, dict):
        raise DipidError(f"{path}: must hold a JSON object of predictor settings, not {type(data).__name__}.")
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise DipidError(f"{path}: unknown predictor setting(s) {', '.join(unknown)}; valid: {', '.join(valid)}.")
    return dict(data)
