"""theta: the trained tensors laid end to end, and the one place that knows where each one lies.

theta is a flat vector of N values: every trained tensor, flattened, in adapter order (per LoRA
layer: A then B when A is trained, B only for LoRA-FA). The step's noise stream uses the same
coordinates: query i owns the counters [i*N, (i+1)*N), so tensor e of query i draws
[i*N + e.offset, i*N + e.offset + e.numel). Eager per-tensor draws, one fused draw over [0, q*N)
and per-query draws therefore give the same bits.

`ThetaLayout` is that layout as data (names, shapes, offsets, plus a description of the adapter
the tensors belong to). It is the only code that slices theta: adapters, estimators, replay,
exporters, the program runtime and checkpoints go through `views`, `gather`, `scatter`, `span`
and `counters`. Its JSON form (`to_json` / `from_json`, versioned) is what replay-log headers
and exported programs' metadata carry.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from zotune.errors import ZotuneError

LAYOUT_VERSION = 1


class LayoutError(ZotuneError):
    """A layout or a set of tensors does not match what was expected."""


@dataclass(frozen=True)
class Entry:
    """One trained tensor's place in theta."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def stop(self) -> int:
        return self.offset + self.numel


@dataclass(frozen=True)
class ThetaLayout:
    entries: tuple[Entry, ...]
    dtype: str = "float32"
    # JSON-ready description of the adapter (kind, rank, alpha, layers, ...): what replay and
    # the exporters need to rebuild or check it without the model.
    adapter: dict = field(default_factory=dict, hash=False)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_shapes(cls, named_shapes, dtype: str = "float32", adapter: dict | None = None) -> ThetaLayout:
        """Entries laid end to end in the order given: (name, shape) pairs."""
        entries, offset = [], 0
        for name, shape in named_shapes:
            entry = Entry(str(name), tuple(int(s) for s in shape), offset)
            entries.append(entry)
            offset = entry.stop
        return cls(tuple(entries), dtype, dict(adapter or {}))

    @classmethod
    def from_adapter(cls, adapter) -> ThetaLayout:
        """The layout of an adapter's trained tensors (`adapter.named_tensors()`, in order) with
        its description (`adapter.describe()`)."""
        named = adapter.named_tensors()
        dtype = str(named[0][1].dtype).removeprefix("torch.") if named else "float32"
        return cls.from_shapes(((n, t.shape) for n, t in named), dtype, adapter.describe())

    def to_json(self) -> dict:
        return {
            "version": LAYOUT_VERSION,
            "numel": self.numel,
            "dtype": self.dtype,
            "tensors": [{"name": e.name, "shape": list(e.shape), "offset": e.offset} for e in self.entries],
            "adapter": dict(self.adapter),
        }

    @classmethod
    def from_json(cls, data, where: str = "layout") -> ThetaLayout:
        """Read `to_json`'s output back, checking version, offsets and total size."""
        if not isinstance(data, dict) or "version" not in data:
            raise LayoutError(
                f"{where}: no layout version (written by an older zotune, whose "
                "layout format this one does not read); re-create the file"
            )
        if data["version"] != LAYOUT_VERSION:
            raise LayoutError(
                f"{where}: layout version {data['version']!r}, this zotune reads version {LAYOUT_VERSION}"
            )
        try:
            tensors = [(d["name"], d["shape"], d["offset"]) for d in data["tensors"]]
            layout = cls.from_shapes(
                ((n, s) for n, s, _ in tensors), str(data["dtype"]), data.get("adapter", {})
            )
            numel = int(data["numel"])
        except (KeyError, TypeError, ValueError) as e:
            raise LayoutError(f"{where}: malformed layout ({type(e).__name__}: {e})") from None
        if [o for _, _, o in tensors] != [e.offset for e in layout.entries]:
            raise LayoutError(f"{where}: tensor offsets are not laid end to end")
        if numel != layout.numel:
            raise LayoutError(f"{where}: numel {numel}, its tensors hold {layout.numel}")
        return layout

    # -- queries -----------------------------------------------------------------------------

    @property
    def numel(self) -> int:
        return self.entries[-1].stop if self.entries else 0

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @functools.cached_property
    def _by_name(self) -> dict[str, Entry]:
        return {e.name: e for e in self.entries}

    def entry(self, name: str) -> Entry:
        if name not in self._by_name:
            raise LayoutError(f"layout has no tensor '{name}'")
        return self._by_name[name]

    def mismatch(self, other: ThetaLayout) -> str | None:
        """What differs between two layouts (None if they describe the same theta)."""
        for key in ("kind", "rank", "alpha"):
            if self.adapter.get(key) != other.adapter.get(key):
                return f"adapter {key} is {self.adapter.get(key)!r} here, {other.adapter.get(key)!r} there"
        if self.numel != other.numel:
            return f"numel is {self.numel} here, {other.numel} there"
        if self.entries != other.entries:
            names = set(self.names) ^ set(other.names)
            return f"differing tensors: {sorted(names)[:4]}" if names else "tensor shapes or offsets differ"
        return None

    # -- the counter stream --------------------------------------------------------------------

    def span(self, name: str, query: int = 0) -> tuple[int, int]:
        """(start, n): the counters of tensor `name` in query `query`'s part of the stream."""
        e = self.entry(name)
        return query * self.numel + e.offset, e.numel

    def counters(self, e: Entry, queries: torch.Tensor) -> torch.Tensor:
        """The counters of entry e for each query. queries: [q] int64 -> [q, e.numel] int64"""
        here = torch.arange(e.offset, e.stop, dtype=torch.int64, device=queries.device)
        return queries.to(torch.int64).unsqueeze(1) * self.numel + here

    # -- moving values in and out of the flat vector -------------------------------------------

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every tensor's part of flat [..., N] as [..., *shape] (views where the memory allows:
        a 1-D flat vector gives views that write through)."""
        lead = flat.shape[:-1]
        return {e.name: flat[..., e.offset : e.stop].reshape(*lead, *e.shape) for e in self.entries}

    def gather(self, tensors, dtype: torch.dtype | None = None) -> torch.Tensor:
        """theta [N] from the tensors in layout order (a sequence), or from a mapping name ->
        tensor (extra keys ignored, names and shapes checked)."""
        if isinstance(tensors, Mapping):
            tensors = self._ordered(tensors)
        parts = [t.reshape(-1) if dtype is None else t.detach().to(dtype).reshape(-1) for t in tensors]
        if not parts:
            return torch.zeros(0, dtype=dtype or torch.float32)
        return torch.cat(parts)

    def _ordered(self, state: Mapping) -> list[torch.Tensor]:
        out = []
        for e in self.entries:
            if e.name not in state:
                raise LayoutError(f"adapter state has no tensor '{e.name}'")
            v = torch.as_tensor(state[e.name])
            if tuple(v.shape) != e.shape:
                raise LayoutError(
                    f"adapter tensor '{e.name}' has shape {list(v.shape)}, the layout expects {list(e.shape)}"
                )
            out.append(v)
        return out

    @torch.no_grad()
    def scatter(self, flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
        """Copy theta [N] into the tensors (layout order), in place."""
        for t, v in zip(tensors, self.views(flat).values(), strict=True):
            t.copy_(v)

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """theta [N] -> name -> tensor, copies."""
        return {name: v.clone() for name, v in self.views(flat).items()}


def theta_of(adapter) -> torch.Tensor:
    """An adapter's theta, a copy. -> [N]"""
    return adapter.layout.gather([t.detach() for t in adapter.tensors()]).clone()


def set_theta(adapter, flat: torch.Tensor) -> None:
    """Write theta [N] into an adapter's trained tensors."""
    adapter.layout.scatter(flat, adapter.tensors())


class FixedTensors:
    """Base of an adapter whose trained tensors are one fixed list of (name, tensor): subclasses
    fill it with `_lay_out`, which also fixes the theta layout."""

    def _lay_out(self, named: list[tuple[str, torch.Tensor]]) -> None:
        self._named = named
        self.layout = ThetaLayout.from_adapter(self)
        self.numel = self.layout.numel

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return list(self._named)

    def tensors(self) -> list[torch.Tensor]:
        return [t for _, t in self._named]
