"""The benchmark's markdown report on CPU: every row has as many cells as its header, with
and without the Liger-Kernel columns."""

from benchmarks.bench import markdown

META = dict(gpu="GPU", torch="2.x", copy_TBps=3.0)
ROW = dict(T=320, C=1280, n=4, H="dynamic", pass_="fwd", mhc_gen_ms=0.04, eager_ms=1.4)


def _cells(line: str) -> int:
    return line.count("|") - 1


def _layer_table(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| T |"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append(line)
    return table


def test_layer_table_without_liger():
    table = _layer_table(markdown(META, [ROW], []))
    assert "Liger" not in table[0]
    assert len({_cells(line) for line in table}) == 1


def test_layer_table_with_liger_and_its_distance():
    rows = [ROW, dict(ROW, liger_ms=0.2, speedup_vs_liger=5.0, liger_rel_err=2e-3)]
    text = markdown(META, rows, [])
    table = _layer_table(text)
    assert "Liger ms" in table[0]
    assert len({_cells(line) for line in table}) == 1
    assert "| 0.200 | 5.0× |" in table[-1]
    assert "relative error ≤ 2.0e-03" in text
