"""What `quantize_` did to each candidate layer, printable as a table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional


@dataclass
class ReportRow:
    name: str
    kind: str  # the original module type (Linear, Conv2d, Conv3d)
    weight_bits: Optional[int]  # None: kept in full precision
    act_bits: Optional[int]
    params: int  # parameters of the original module
    note: str = ""  # why a layer stayed float, or which override applied

    @property
    def quantized(self) -> bool:
        return self.weight_bits is not None


@dataclass
class QuantizationReport:
    rows: List[ReportRow]

    def __iter__(self) -> Iterator[ReportRow]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def quantized(self) -> List[ReportRow]:
        return [row for row in self.rows if row.quantized]

    @property
    def kept_float(self) -> List[ReportRow]:
        return [row for row in self.rows if not row.quantized]

    def row(self, name: str) -> ReportRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"No layer named '{name}' in the report.")

    def __str__(self) -> str:
        header = ("layer", "kind", "W", "A", "params", "note")
        body = [(r.name, r.kind, "fp" if r.weight_bits is None else str(r.weight_bits),
                 "fp" if r.act_bits is None else str(r.act_bits), f"{r.params:,}", r.note)
                for r in self.rows]
        widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
                 for line in [header, *body]]
        lines.insert(1, "  ".join("-" * width for width in widths))
        total = sum(r.params for r in self.quantized)
        lines.append(f"{len(self.quantized)} quantized layers ({total:,} params), "
                     f"{len(self.kept_float)} kept in full precision")
        return "\n".join(lines)
