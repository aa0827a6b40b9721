"""MindIE's performance CSV (modeltest's model_test.py): its exact header, rows from the benchmarks' timings.

MindIE's definitions: first token time = the prefill forward of the batch; non-first token time = the mean decode
step; non-first throughput = batch / decode step; E2E throughput = batch x Out_seq / total time; the two "Average"
columns are means over all rows, written on the last row.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

MINDIE_COLUMNS = [
    "Model", "Batchsize", "In_seq", "Out_seq", "Total time(s)", "First token time(ms)", "Non-first token time(ms)",
    "Non-first token Throughput(Tokens/s)", "E2E Throughput(Tokens/s)", "Non-first token Throughput Average(Tokens/s)",
    "E2E Throughput Average(Tokens/s)",
]


@dataclass
class MindieRow:
    model: str
    batch_size: int
    input_len: int
    output_len: int
    total_s: float
    first_token_ms: float
    decode_ms: float

    @property
    def decode_throughput(self) -> float:
        return self.batch_size / (self.decode_ms / 1000) if self.decode_ms else 0.0

    @property
    def e2e_throughput(self) -> float:
        return self.batch_size * self.output_len / self.total_s

    @classmethod
    def from_timing(cls, model: str, t) -> "MindieRow":
        """`t`: a bench.timing.BatchTiming."""
        return cls(model, t.batch_size, t.input_len, t.output_len, t.total_s, t.first_token_s * 1000,
                   t.decode_step_s * 1000)


def mindie_csv(rows: list[MindieRow]) -> str:
    """The CSV MindIE's performance test writes: its exact header, the averages on the last row."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(MINDIE_COLUMNS)
    decode_avg = sum(r.decode_throughput for r in rows) / len(rows) if rows else 0.0
    e2e_avg = sum(r.e2e_throughput for r in rows) / len(rows) if rows else 0.0
    for i, r in enumerate(rows):
        last = i == len(rows) - 1
        writer.writerow([
            r.model, r.batch_size, r.input_len, r.output_len, f"{r.total_s:.10f}", f"{r.first_token_ms:.2f}",
            f"{r.decode_ms:.2f}", f"{r.decode_throughput:.2f}", f"{r.e2e_throughput:.2f}",
            f"{decode_avg:.2f}" if last else "", f"{e2e_avg:.2f}" if last else "",
        ])
    return out.getvalue()
