"""The streaming spec: attention sinks, a sliding window, and which layers keep full attention.

Each token attends to the first ``sinks`` tokens of the stream and to the
``window`` most recent tokens, itself included (``sink_window`` layers), or to
every earlier token (``full`` layers); ``ssm`` layers (a hybrid's Mamba mixers)
carry a fixed-size state instead of keys and values. Positions are re-indexed inside the
cache, so no relative distance exceeds ``sinks + window - 1`` on a
``sink_window`` layer however long the stream runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from streamify.errors import InputError, UsageError

CONFIG_KEY = "streamify_streaming"
SINK_WINDOW, FULL, SSM = "sink_window", "full", "ssm"


@dataclass(frozen=True)
class StreamingSpec:
    """Sinks, window and the per-layer kind (``sink_window``, ``full`` or ``ssm``)."""

    sinks: int
    window: int
    layer_types: tuple[str, ...]

    @property
    def full_layers(self) -> list[int]:
        """Indices of the layers that keep full attention."""
        return [i for i, kind in enumerate(self.layer_types) if kind == FULL]

    @property
    def capacity(self) -> int:
        """Tokens a ``sink_window`` layer keeps between steps."""
        return self.sinks + self.window - 1

    def to_json(self) -> dict:
        """The spec as stored in config.json and the manifest."""
        data = asdict(self)
        data["layer_types"] = list(self.layer_types)
        data["full_layers"] = self.full_layers
        return data

    @classmethod
    def from_json(cls, data: dict) -> StreamingSpec:
        """Read a spec written by :meth:`to_json`."""
        return cls(int(data["sinks"]), int(data["window"]), tuple(data["layer_types"]))


def parse_full_layers(text: str | list[int], num_layers: int, flag: str = "--full-layers") -> list[int]:
    """Layer indices (full-attention ones for ``flag``) from ``none``, ``every:K``, ``middle-third`` or a list
    such as ``3,7``.

    ``every:K`` makes every K-th layer full (indices K-1, 2K-1, ...);
    ``middle-third`` the layers ``n//3`` to ``2n//3 - 1``.
    """
    if isinstance(text, list):
        indices = text
    else:
        spec = text.strip().lower()
        if spec in ("none", ""):
            return []
        if spec == "middle-third":
            return list(range(num_layers // 3, 2 * num_layers // 3))
        if spec.startswith("every:"):
            step = _int(spec.removeprefix("every:"), text, flag)
            if step < 1:
                raise UsageError(f"{flag} {text}: K must be at least 1", "use every:K with K >= 1, e.g. every:3")
            return list(range(step - 1, num_layers, step))
        indices = [_int(part, text, flag) for part in spec.split(",") if part.strip()]
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
        raise UsageError(
            f"{flag}: layer index {bad[0]} is out of range; the model has {num_layers} layers (0-{num_layers - 1})",
            "give indices between 0 and the layer count minus one, or none, every:K, middle-third",
        )
    return sorted(set(indices))


def _int(text: str, whole: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(
            f"{flag} {whole}: '{text}' is not a layer index",
            "use a list of indices (3,7), none, every:K or middle-third",
        ) from None


def make_spec(
    sinks: int, window: int, full_layers: str | list[int], num_layers: int, ssm_layers: tuple[int, ...] = ()
) -> StreamingSpec:
    """Validate sinks and window and build the spec for a model with ``num_layers`` layers (``ssm_layers``:
    a hybrid's Mamba layers)."""
    if window <= 0:
        raise UsageError(f"--window {window}: the window must be at least 1 token", "use e.g. --window 1024")
    if sinks < 0:
        raise UsageError(f"--sinks {sinks}: sinks cannot be negative", "use 4 (StreamingLLM's default) or 0")
    if sinks > window:
        raise UsageError(
            f"--sinks {sinks} is larger than --window {window}",
            "keep a few sink tokens (4 is the default) and a window much larger than that",
        )
    full = set(parse_full_layers(full_layers, num_layers))
    kinds = (SSM if i in ssm_layers else FULL if i in full else SINK_WINDOW for i in range(num_layers))
    return StreamingSpec(sinks, window, tuple(kinds))


def read_spec(config, where: str = "config.json") -> StreamingSpec | None:
    """The spec stored in a model config, or None for a model that is not streaming."""
    data = getattr(config, CONFIG_KEY, None)
    if data is None:
        return None
    try:
        return StreamingSpec.from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(
            f"{where}: the '{CONFIG_KEY}' entry is malformed ({exc})",
            "re-create the artifact with streamify convert streaming",
        ) from exc
