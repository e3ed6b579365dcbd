"""Plain-text tables: ``pact-fast compare``, the compile gate and the benchmarks print theirs through here."""


def text_table(rows, cols, cell=str, missing=""):
    """Rows (dicts) as left-aligned columns ``cols`` separated by two spaces, under a header line.

    ``cell(value)`` renders a value; a row without a column's key gives ``missing`` to ``cell``."""
    cells = [[cell(r.get(c, missing)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
    lines += ["  ".join(x.ljust(w) for x, w in zip(cell_row, widths)).rstrip() for cell_row in cells]
    return "\n".join(lines)
