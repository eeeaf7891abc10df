import numpy as np
import pyarrow.parquet as pq

from instseg_core.structures import Instances
from pipelines.rows import error_row, ok_row, rows_to_table
from pipelines.sinks import (done_ids_of, done_shards, finish_shard, list_parts, part_name, parts_by_shard,
                             remove_staging_files, write_part)


def _rows(uris):
    m = np.zeros((1, 4, 5), bool)
    m[0, 1:3, 1:4] = True
    inst = Instances(np.array([[1, 1, 4, 3]]), [0.9], [0], m, (4, 5))
    return [ok_row(u, inst, ["a"], "r", "M") if i % 2 == 0 else error_row(u, "corrupt", "bad", "r", "M")
            for i, u in enumerate(uris)]


def test_part_names_are_idempotent(tmp_path):
    t = rows_to_table(_rows(["a", "b"]))
    first = write_part(t, str(tmp_path), shard_id="s00000001", shard_total=2)
    again = write_part(t, str(tmp_path), shard_id="s00000001", shard_total=2)  # a retried write replaces
    assert first == again and len(list_parts(str(tmp_path))) == 1
    assert part_name(np.array([2, 1]), "s1") == part_name(np.array([1, 2]), "s1") != part_name(np.array([1, 2]), "s2")
    assert parts_by_shard(list_parts(str(tmp_path))) == {"s00000001": [first]}


def test_finish_shard_dedups_counts_and_marks_done(tmp_path):
    """Per shard: a row written twice (a failure) is dropped, an ok row replaces the error row of a
    retried image, the counts are exact, and the done marker appears only when every URI of the
    shard has a row."""
    out = str(tmp_path)
    write_part(rows_to_table(_rows(["a", "b", "c"])), out, shard_id="s1", shard_total=5, shard_duplicates=1)
    write_part(rows_to_table(_rows(["c", "d"])), out, shard_id="s1", shard_total=5)  # 'c' twice: a failure
    (tmp_path / "parts" / ".part-x.parquet.1234.tmp").write_bytes(b"half")
    assert remove_staging_files(out) == 1
    parts = parts_by_shard(list_parts(out))["s1"]
    # b and d are corrupt (permanent): done unless --retry-errors all; a retry of everything redoes them
    assert len(done_ids_of(parts)) == 4 and len(done_ids_of(parts, retry="all")) == 2
    counts = finish_shard(out, "s1", parts)
    assert counts["images"] == 4 and counts["duplicates_removed"] == 1 and not counts["complete"]
    assert counts["by_status"] == {"ok": 2, "error": 2} and counts["instances"] == 2 and counts["source_duplicates"] == 1
    assert done_shards(out) == set()
    uris = sorted(u for p in list_parts(out) for u in pq.read_table(p).column("uri").to_pylist())
    assert uris == ["a", "b", "c", "d"]
    # the fifth URI arrives, and "b" is retried successfully (ok row wins over the old error row)
    retried = _rows(["b"])[0]
    write_part(rows_to_table([_rows(["e"])[0], retried]), out, shard_id="s1", shard_total=5)
    counts = finish_shard(out, "s1", parts_by_shard(list_parts(out))["s1"])
    assert counts["complete"] and counts["images"] == 5 and counts["by_status"] == {"ok": 4, "error": 1}
    assert done_shards(out) == {"s1"} and done_shards(out, retry="all") == set()  # d is corrupt: "all" redoes it
    rows = [r for p in list_parts(out) for r in pq.read_table(p).to_pylist()]
    assert sorted(r["uri"] for r in rows) == ["a", "b", "c", "d", "e"]
    assert next(r for r in rows if r["uri"] == "b")["status"] == "ok"
    assert finish_shard(out, "s1", []) == counts  # a finished shard answers from its marker


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
