"""Trained per-style networks (method network), kept by key while the process lives: states in, networks
out. The driver keeps the files (training.Trainer); the engine only runs them."""

from __future__ import annotations

import torch

from ..errors import PairError
from . import network


class Models:
    def __init__(self, device: torch.device):
        self.device = device
        self._nets: dict[str, network.TransformerNet] = {}

    def load(self, key: str, state: dict) -> None:
        self._nets[key] = network.from_state_dict(state, self.device).net.eval()

    def __contains__(self, key: str) -> bool:
        return key in self._nets

    def get(self, key: str) -> network.TransformerNet:
        if key not in self._nets:
            raise PairError("internal", "no trained network for this style was loaded")
        return self._nets[key]
