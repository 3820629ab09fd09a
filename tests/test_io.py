"""costmodel.io: atomic writes (never a partial file), frames, provenance notes, printed tables."""
import json
import os
import stat

import pandas as pd
import pytest

from costmodel.errors import InputError
from costmodel.io import atomic_write, print_table, read_json, write_frame, write_json, write_provenance, write_text


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_modes_and_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        p = write_text(tmp_path / "new" / "a.txt", "hello\n")  # missing folders are created
        assert p.read_text() == "hello\n" and _mode(p) == 0o644  # not mkstemp's 0600
        atomic_write(tmp_path / "b.bin", lambda fh: fh.write(b"\x00\x01"), mode="wb")
        assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
        atomic_write(tmp_path / "c.txt", lambda tmp: open(tmp, "w").write("by name"), mode="path")
        assert (tmp_path / "c.txt").read_text() == "by name" and _mode(tmp_path / "c.txt") == 0o644
    finally:
        os.umask(umask)
    with pytest.raises(ValueError):
        atomic_write(tmp_path / "d.txt", lambda fh: None, mode="a")


@pytest.mark.parametrize("mode", ["w", "path"])
def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, mode):
    p = write_text(tmp_path / "out.json", "old")

    def fail(fh):
        (fh.write("partial") if mode == "w" else open(fh, "w").write("partial"))
        raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError):
        atomic_write(p, fail, mode=mode)
    assert p.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["out.json"]


def test_json_frames_and_provenance(tmp_path):
    write_json(tmp_path / "m.json", {"a": [1, 2]})
    assert (tmp_path / "m.json").read_text() == json.dumps({"a": [1, 2]}, indent=1)
    df = pd.DataFrame({"x": [1, 2], "y": [0.5, 1.5]})
    write_frame(tmp_path / "f.csv", df)
    assert (tmp_path / "f.csv").read_text() == "x,y\n1,0.5\n2,1.5\n"
    write_frame(tmp_path / "f.parquet", df, "parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "f.parquet"), df)
    p = write_provenance(tmp_path / "bench", "h100_sxm", ["Measured here.", "", "* one"])
    assert p == tmp_path / "bench" / "SOURCE_h100_sxm.md"
    assert p.read_text() == "# Provenance of `h100_sxm` tables\n\nMeasured here.\n\n* one\n"


def test_print_table(capsys):
    print_table([])
    print_table([{"file": "a.jsonl", "n": 3, "mape_pct": 1.234}, {"file": "all", "n": 12, "mape_pct": 10.0}])
    assert capsys.readouterr().out.splitlines() == ["file     n   mape_pct",
                                                    "a.jsonl  3   1.23    ",
                                                    "all      12  10.00   "]


def test_read_json_names_file_and_line(tmp_path):
    p = write_text(tmp_path / "config.json", '{"a": 1,\n "b": }\n')
    with pytest.raises(InputError, match=r"config.json:2: malformed JSON: Expecting value"):
        read_json(p)
    assert read_json(write_json(tmp_path / "ok.json", {"a": [1]})) == {"a": [1]}
