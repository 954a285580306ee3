"""A full disk during a shard write, through the generation job's entry point (no Ray: the solve loop,
the cluster start and the verifier are stand-ins). The job ends with one clear line naming the output
folder and exit 1; the shards committed before stay, the partial temporary file is removed, the
actors are still shut down, and the same command afterwards continues where it stopped."""

from __future__ import annotations

import errno

import pytest

from gen_ssd_ray.generate.manifest import read_output


class FakeVerifier:
    def __init__(self, *a, **k):
        self.closed = False

    def verify_rows(self, rows):
        pass

    def counters(self):
        return {"checks": 0, "errors": 0, "timeouts": 0, "lost": 0, "pool_restarts": 0}

    def close(self):
        self.closed = True


@pytest.mark.parametrize("fail_at_shard", [0, 2])
def test_disk_full_mid_run_exits_1_with_one_line_and_loses_nothing(
    tmp_path, monkeypatch, capsys, fail_at_shard
):
    from types import SimpleNamespace

    import gen_ssd_ray.common.verify as verify
    from gen_ssd_ray.generate import driver, output, solve
    from gen_ssd_ray.sim.harness import PRESET, write_problems
    from jobs.generate import main

    data = write_problems(tmp_path / "p.jsonl", 10)
    out = tmp_path / "out"
    args = ["--config", str(PRESET), f"data.path={data}", f"output.dir={out}", "output.shard_size=2"]

    def fake_solve_all(cfg, pools, todo, fp, stats, stop, **kw):
        for q in todo:
            yield q, solve.error_rows(cfg, q, "stand-in", fp)

    monkeypatch.setattr(driver, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(driver, "solve_all", fake_solve_all)
    monkeypatch.setattr(verify, "Verifier", FakeVerifier)
    monkeypatch.setattr(verify, "check_verifier", lambda *a, **k: None)  # the preflight: test_verify.py
    import gen_ssd_ray.generate.pools as pools_mod

    shut = []
    monkeypatch.setattr(pools_mod, "build_pools", lambda *a, **k: SimpleNamespace(managers=[]))
    monkeypatch.setattr(pools_mod, "shutdown_pools", lambda pools: shut.append(pools))

    real_write, written = output.pq.write_table, []

    def write_table(table, where, **kw):
        if len(written) == fail_at_shard:
            where.write(b"PAR1 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(table.num_rows)
        return real_write(table, where, **kw)

    monkeypatch.setattr(output.pq, "write_table", write_table)
    code = main(args)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == 1, err
    assert len(err) == 1 and str(out) in err[0] and "No space left on device" in err[0], err
    assert "re-run the same command" in err[0]
    assert shut, "the actors are shut down"
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    assert read_output(out).num_rows == 2 * fail_at_shard  # one trajectory per problem, 2 per shard

    monkeypatch.setattr(output.pq, "write_table", real_write)  # space freed: the same command finishes
    assert main(args) == 0
    assert sorted(set(read_output(out).column("problem_id").to_pylist())) == sorted(
        f"p-{i}" for i in range(10)
    )
