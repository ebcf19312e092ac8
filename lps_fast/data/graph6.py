"""graph6: Brendan McKay's compact text format for undirected simple graphs (nauty's ``geng``
prints it). Specification: https://users.cecs.anu.edu.au/~bdm/data/formats.txt

A line is ``N(n) R(x)``. ``N(n)`` is one byte ``n + 63`` for ``n <= 62``, else ``126`` and
three bytes (18 bits) for ``n <= 258047``, else ``126 126`` and six bytes (36 bits), each byte
holding 6 bits big-endian plus 63. ``R(x)`` is the upper triangle read column by column,
``x(0,1), x(0,2), x(1,2), x(0,3), x(1,3), x(2,3), ...``, padded with zeros to a multiple of 6
bits, 6 bits per byte, each plus 63. A file may start with the header ``>>graph6<<``.
"""

from __future__ import annotations

import os
from typing import List, Union

import numpy as np

HEADER = b">>graph6<<"
_LOW, _HIGH = 63, 126


def _six_bit_values(data: bytes, line: bytes) -> np.ndarray:
    values = np.frombuffer(data, dtype=np.uint8)
    if values.size and (values.min() < _LOW or values.max() > _HIGH):
        raise ValueError(f"graph6: byte outside 63..126 in {line[:40]!r}")
    return values - _LOW


def _decode_size(line: bytes):
    """``(n, offset of R(x))``."""
    if not line:
        raise ValueError("graph6: empty line")
    if line[0] != _HIGH:
        return line[0] - _LOW, 1
    if len(line) >= 2 and line[1] == _HIGH:
        width, start = 6, 2
    else:
        width, start = 3, 1
    if len(line) < start + width:
        raise ValueError(f"graph6: truncated size field in {line[:40]!r}")
    n = 0
    for value in _six_bit_values(line[start:start + width], line):
        n = (n << 6) | int(value)
    return n, start + width


def decode_graph6(line: Union[str, bytes]) -> np.ndarray:
    """One graph6 string (without the newline) to an ``(n, n)`` symmetric bool adjacency."""
    if isinstance(line, str):
        line = line.encode("ascii")
    line = line.strip()
    if line.startswith(HEADER):
        line = line[len(HEADER):]
    if line[:1] in (b":", b";"):
        raise ValueError("graph6: this is sparse6 (starts with ':' or ';'), not graph6")
    if line[:1] == b"&":
        raise ValueError("graph6: this is digraph6 (starts with '&'), not graph6")
    n, start = _decode_size(line)
    pair_count = n * (n - 1) // 2
    expected = (pair_count + 5) // 6
    if len(line) - start != expected:
        raise ValueError(
            f"graph6: a graph on {n} nodes needs {expected} edge bytes, got {len(line) - start}"
        )
    # each value holds 6 bits; shifting by 2 left-aligns them in a byte for unpackbits
    values = _six_bit_values(line[start:], line).astype(np.uint8) << 2
    bits = np.unpackbits(values[:, None], axis=1)[:, :6].reshape(-1)[:pair_count].astype(bool)
    # column-by-column upper triangle == row-major strict lower triangle of the transpose
    columns, rows = np.tril_indices(n, -1)
    adjacency = np.zeros((n, n), dtype=bool)
    adjacency[rows, columns] = bits
    adjacency[columns, rows] = bits
    return adjacency


def _encode_six_bit(bits: np.ndarray) -> bytes:
    padded = np.zeros(((len(bits) + 5) // 6) * 6, dtype=np.uint8)
    padded[:len(bits)] = bits
    weights = np.array([32, 16, 8, 4, 2, 1], dtype=np.uint8)
    return bytes((padded.reshape(-1, 6) * weights).sum(axis=1).astype(np.uint8) + _LOW)


def encode_graph6(adjacency: np.ndarray) -> str:
    """An ``(n, n)`` symmetric 0/1 adjacency to its graph6 string (no header, no newline)."""
    adjacency = np.asarray(adjacency)
    if adjacency.ndim != 2 or adjacency.shape[0] != adjacency.shape[1]:
        raise ValueError(f"encode_graph6: adjacency must be (n, n), got {adjacency.shape}")
    n = adjacency.shape[0]
    if n <= 62:
        size = bytes([n + _LOW])
    else:
        width = 3 if n <= 258047 else 6
        digits = [(n >> (6 * shift)) & 63 for shift in reversed(range(width))]
        size = bytes([_HIGH] * (1 if width == 3 else 2) + [digit + _LOW for digit in digits])
    columns, rows = np.tril_indices(n, -1)
    return (size + _encode_six_bit(adjacency[rows, columns].astype(bool))).decode("ascii")


def read_graph6(path: Union[str, os.PathLike]) -> List[np.ndarray]:
    """Every graph in a graph6 file (blank lines skipped), as ``(n, n)`` bool arrays."""
    with open(path, "rb") as handle:
        return parse_graph6(handle.read())


def parse_graph6(text: Union[str, bytes]) -> List[np.ndarray]:
    """Every graph in graph6 text with one graph per line."""
    if isinstance(text, str):
        text = text.encode("ascii")
    graphs = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line.startswith(HEADER):
            line = line[len(HEADER):]
        if not line:
            continue
        try:
            graphs.append(decode_graph6(line))
        except ValueError as error:
            raise ValueError(f"line {number}: {error}") from None
    return graphs
