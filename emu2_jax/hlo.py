"""Collective traffic of a compiled XLA program, read from its HLO text (`compiled.as_text()`).

XLA's cost analysis counts neither collectives nor while-loop trip counts, so `aot` walks the
optimized module itself: every all-gather / all-reduce / reduce-scatter / all-to-all /
collective-permute (sync or async `-start`), its result shape and replica-group size, multiplied by
the trip counts of the while loops around it (scans over layers and microbatches). A loop's trip
count is the s32 constant its condition compares the counter with (how XLA lowers `scan` / `fori`);
a loop whose count cannot be read counts once and is reported.

Bytes per chip are what a bandwidth-optimal (ring) algorithm sends over a group of n chips for a
result of S bytes: all-gather S(n-1)/n, reduce-scatter S(n-1), all-reduce 2S(n-1)/n, all-to-all
S(n-1)/n, collective-permute S.
"""
from __future__ import annotations

import dataclasses
import re
from collections import Counter, defaultdict

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "s4": 0.5, "u4": 0.5}
KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_OP = re.compile(r"=\s*(.+?)\s+(" + "|".join(KINDS) + r")(-start)?\(")
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\]")
_CALLS = re.compile(r"\b(?:calls|to_apply|body|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_WHILE = re.compile(r"\bwhile\(.*condition=%([\w.\-]+), body=%([\w.\-]+)")
_TRIP = re.compile(r"s32\[\](?:\{[^}]*\})? constant\((\d+)\)")


@dataclasses.dataclass
class Traffic:
    bytes_per_chip: float                 # summed over every execution in one run of the program
    by_kind: dict[str, float]             # the same per collective kind
    ops: int                              # collective instructions (each counted once)
    unknown_trip_counts: int              # while loops counted once because their count was unreadable


def _shape_bytes(text: str, start: bool) -> float:
    """Bytes of a collective's result shape: a tuple's arrays summed (a variadic all-reduce), or for
    an async `-start` (operands and results in one tuple) its largest array."""
    sizes = []
    for dtype, dims in _ARRAY.findall(text):
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        sizes.append(count * _DTYPE_BYTES[dtype])
    return (max(sizes, default=0.0) if start else sum(sizes))


def _group_size(line: str) -> int:
    """Chips per replica group: `[G,n]<=[...]` (iota), `mesh[...] {'axis'}` or explicit `{{0,1},...}`."""
    if m := re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line):
        return int(m.group(2))
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line):
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
        size = 1
        for axis in re.findall(r"'(\w+)'", m.group(2)):
            size *= int(sizes[axis])
        return size
    if m := re.search(r"replica_groups=\{\{([\d,]*)\}", line):
        return len(m.group(1).split(","))
    if m := re.search(r"source_target_pairs=", line):
        return 2
    return 1


def _per_chip(kind: str, result_bytes: float, n: int) -> float:
    if n <= 1:
        return 0.0
    return {"all-gather": result_bytes * (n - 1) / n, "reduce-scatter": result_bytes * (n - 1),
            "all-reduce": 2 * result_bytes * (n - 1) / n, "all-to-all": result_bytes * (n - 1) / n,
            "collective-permute": result_bytes}[kind]


def collective_traffic(hlo_text: str) -> Traffic:
    """Collective bytes per chip of one execution of the module's entry computation."""
    own: dict[str, Counter] = defaultdict(Counter)       # computation -> kind -> bytes
    calls: dict[str, list[tuple[str, int]]] = defaultdict(list)
    constants: dict[str, list[int]] = defaultdict(list)
    whiles: list[tuple[str, str, str]] = []              # (caller, condition, body)
    entry, current, ops = None, None, 0
    for line in hlo_text.splitlines():
        if header := _HEADER.match(line):
            current = header.group(1)
            entry = current if line.startswith("ENTRY") else entry
            continue
        if current is None:
            continue
        if op := _OP.search(line):
            kind = op.group(2)
            own[current][kind] += _per_chip(kind, _shape_bytes(op.group(1), bool(op.group(3))), _group_size(line))
            ops += 1
        constants[current] += [int(c) for c in _TRIP.findall(line)]
        if loop := _WHILE.search(line):
            whiles.append((current, loop.group(1), loop.group(2)))
            continue
        calls[current] += [(callee, 1) for callee in _CALLS.findall(line)]
        for branches in _BRANCHES.findall(line):  # a conditional: its costliest branch (max below)
            calls[current].append(("|".join(b.strip().lstrip("%") for b in branches.split(",")), 1))

    def trip_constants(name: str, seen: frozenset = frozenset()) -> set[int]:
        """The s32 constants of a condition and of what it calls (TPU fuses the compare)."""
        found = set(constants[name])
        for callee, _ in calls[name]:
            if callee not in seen and "|" not in callee:
                found |= trip_constants(callee, seen | {name})
        return found

    unknown = 0
    for caller, condition, body in whiles:
        trips = sorted(trip_constants(condition))
        trip = trips[0] if len(trips) == 1 else 1
        unknown += len(trips) != 1
        calls[caller] += [(body, trip), (condition, trip + 1)]

    memo: dict[str, Counter] = {}

    def total(name: str) -> Counter:
        if "|" in name:
            return max((total(b) for b in name.split("|")), key=lambda c: sum(c.values()), default=Counter())
        if name not in memo:
            memo[name] = Counter()  # guards against cycles (none in valid HLO)
            out = Counter(own[name])
            for callee, times in calls[name]:
                for kind, value in total(callee).items():
                    out[kind] += times * value
            memo[name] = out
        return memo[name]

    by_kind = total(entry) if entry else Counter()
    return Traffic(float(sum(by_kind.values())), dict(by_kind), ops, unknown)
