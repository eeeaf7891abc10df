import numpy as np
import pyarrow.parquet as pq

from instseg_core.structures import Instances
from pipelines.rows import error_row, ok_row, rows_to_table
from pipelines.sinks import (deduplicate_parts, done_image_ids, list_parts, part_name, remove_staging_files,
                             summarize, write_part)


def _rows(uris):
    m = np.zeros((1, 4, 5), bool)
    m[0, 1:3, 1:4] = True
    inst = Instances(np.array([[1, 1, 4, 3]]), [0.9], [0], m, (4, 5))
    return [ok_row(u, inst, ["a"], "r", "M") if i % 2 == 0 else error_row(u, "corrupt", "bad", "r", "M")
            for i, u in enumerate(uris)]


def test_part_names_are_idempotent(tmp_path):
    t = rows_to_table(_rows(["a", "b"]))
    first = write_part(t, str(tmp_path))
    again = write_part(t, str(tmp_path))  # a retried write of the same rows replaces the file
    assert first == again and len(list_parts(str(tmp_path))) == 1
    assert part_name(np.array([2, 1])) == part_name(np.array([1, 2]))


def test_done_ids_dedup_and_summary(tmp_path):
    out = str(tmp_path)
    write_part(rows_to_table(_rows(["a", "b", "c"])), out)
    write_part(rows_to_table(_rows(["c", "d"])), out)  # 'c' twice, as after a failure
    (tmp_path / "parts" / ".part-x.parquet.1234.tmp").write_bytes(b"half")
    assert len(done_image_ids(out)) == 4
    assert remove_staging_files(out) == 1
    assert deduplicate_parts(out) == 1
    uris = [u for p in list_parts(out) for u in pq.read_table(p).column("uri").to_pylist()]
    assert sorted(uris) == ["a", "b", "c", "d"]
    s = summarize(out)
    # a, c ok (1 instance each); b, d errors; the second copy of c was dropped
    assert s == {"images": 4, "by_status": {"ok": 2, "error": 2}, "errors_by_kind": {"corrupt": 2}, "instances": 2}


def test_part_files_and_summary_follow_the_umask(tmp_path):
    """Outputs are readable by the team (0644 under umask 022), not mkstemp's 0600; splits too."""
    import json
    import os
    import stat

    from instseg_core.datasets.split import write_json_replacing
    from pipelines.sinks import write_json, write_part

    old = os.umask(0o022)
    try:
        part = write_part(rows_to_table([error_row("/x.jpg", "corrupt", "bad", "r", "m")]), str(tmp_path / "out"))
        write_json(str(tmp_path / "out" / "summary.json"), {"a": 1})
        target = tmp_path / "ann.json"
        target.write_text("{}")
        backup = write_json_replacing(target, {"b": 2})
    finally:
        os.umask(old)
    for path in (part, tmp_path / "out" / "summary.json", target):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path
    assert backup is not None and json.loads(backup.read_text()) == {} and json.loads(target.read_text()) == {"b": 2}
    assert not [p for p in tmp_path.rglob(".*.tmp")]
