"""rotaq.dist: the primitives on 2 gloo processes, and their single-process no-ops."""

import os
import socket

import numpy as np
import torch.multiprocessing as mp

from rotaq import dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(size),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    dist.init()
    try:
        assert dist.world() == (rank, size)
        a = np.full((3, 3), float(rank + 1))
        total = dist.allreduce_sum(a)
        n = dist.allreduce_int(10 + rank)
        sl = dist.shard(7)
        solved = dist.share(list(range(5)), lambda x: (x * x, dist.world()[0]))
        got = dist.broadcast({"w": np.arange(4) + rank}, src=1)
        np.savez(os.path.join(out_dir, f"r{rank}.npz"), total=total, n=n,
                 shard=np.array([sl.start, sl.stop]),
                 solved=np.array(solved), got=got["w"])
    finally:
        dist.finish()


def test_two_gloo_ranks(tmp_path):
    port = _free_port()
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (np.load(tmp_path / f"r{r}.npz") for r in (0, 1))
    for r in (r0, r1):
        np.testing.assert_array_equal(r["total"], np.full((3, 3), 3.0))
        assert int(r["n"]) == 21
        # item i solved on rank i % 2, every rank holds every result
        np.testing.assert_array_equal(r["solved"], [[0, 0], [1, 1], [4, 0], [9, 1], [16, 0]])
        np.testing.assert_array_equal(r["got"], np.arange(4) + 1)
    # the two shards cover 7 samples, without overlap
    assert (tuple(r0["shard"]), tuple(r1["shard"])) == ((0, 3), (3, 7))


def test_single_process_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist.init()
    assert dist.world() == (0, 1) and dist.is_main() and not dist.active()
    a = np.ones(3)
    assert dist.allreduce_sum(a) is a
    assert dist.shard(5) == slice(0, 5)
    assert dist.share([1, 2, 3], lambda x: -x) == [-1, -2, -3]
