"""The node's autonomous replicas (aivailable/autonomy.py) and the retiring ones: one owner, named transitions.

Node owns one `AutonomousReplicas`; AutonomyLoop (aivailable/autonomy_loop.py) is the only caller of its
transitions, applying each `autonomy.Decision`; everyone else reads the views. No I/O.

    add ──> held ──adopt──> gone (the placement runs it now)
             │ ──evict──> gone (unloaded at once)
             └─retire──> retiring ──unloaded──> gone (drained first)
"""

from __future__ import annotations

from collections.abc import Collection


class AutonomousReplicas:
    """Per model: at most one held autonomous replica (own GPU id, why) and one retiring one (GPU id)."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[str, str]] = {}
        self._retiring: dict[str, str] = {}

    # -- transitions (AutonomyLoop only) --------------------------------------------------------
    def add(self, model: str, gpu: str, why: str) -> None:
        """A new autonomous replica of `model` on own GPU `gpu` (a retiring one may still be draining)."""
        if model in self._held:
            raise ValueError(f"{model} already has an autonomous replica on {self._held[model][0]}")
        self._held[model] = (gpu, why)

    def adopt(self, model: str) -> str:
        """The placement now asks for the held replica on its GPU: no longer autonomous. Returns the GPU."""
        return self._take(model, "adopt")

    def evict(self, model: str) -> str:
        """The placement needs the held replica's VRAM: it is forgotten (unloaded at once). Returns the GPU."""
        return self._take(model, "evict")

    def retire(self, model: str) -> str:
        """The held replica stops taking new requests and drains before it is unloaded. Returns the GPU."""
        gpu = self._take(model, "retire")
        self._retiring[model] = gpu
        return gpu

    def unloaded(self, model: str, gpu: str) -> bool:
        """The retiring replica of `model` on `gpu` has drained: forget it. False if that is not the one
        retiring (a later retire of the same model on another GPU stays)."""
        if self._retiring.get(model) != gpu:
            return False
        del self._retiring[model]
        return True

    def _take(self, model: str, what: str) -> str:
        if model not in self._held:
            raise ValueError(f"cannot {what} {model}: no autonomous replica of it is held")
        return self._held.pop(model)[0]

    # -- views ---------------------------------------------------------------------------------
    def held(self) -> dict[str, str]:
        """Held autonomous replicas: model -> GPU id (a copy)."""
        return {m: g for m, (g, _why) in self._held.items()}

    def retiring(self) -> dict[str, str]:
        """Retiring replicas: model -> GPU id (a copy)."""
        return dict(self._retiring)

    def serving(self) -> dict[str, str]:
        """Every replica this node runs outside the placement: model -> GPU id (retiring wins for a model
        that has both)."""
        return {**self.held(), **self._retiring}

    def is_retiring(self, model: str, device_ids: Collection[str]) -> bool:
        """Whether the replica of `model` on `device_ids` is retiring (draining: no new requests)."""
        gpu = self._retiring.get(model)
        return gpu is not None and gpu in device_ids

    def reason(self, model: str, device_ids: Collection[str]) -> str | None:
        """Why the replica of `model` on `device_ids` runs autonomously, or None if it is not held."""
        held = self._held.get(model)
        return held[1] if held is not None and held[0] in device_ids else None

    def __bool__(self) -> bool:
        return bool(self._held or self._retiring)
