"""Shared by the examples: a predictor from the shipped weights, or an untrained one saying so."""

from __future__ import annotations

import logging

from dipid import JointPredictor, WeightsNotFoundError
from dipid.models import build_sslm, build_tlm


def get_predictor(weights: str | None = None, device: str = "auto") -> JointPredictor:
    try:
        return JointPredictor.from_pretrained(weights, device=device)
    except WeightsNotFoundError as exc:
        logging.getLogger("examples").warning("%s\n-> using UNTRAINED models: the masks below are meaningless", exc)
        return JointPredictor(tlm=build_tlm(), sslm=build_sslm(), device=device)
