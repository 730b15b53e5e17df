"""``deepfake-pack --ray ADDRESS`` on a two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a
head and a second node, one CPU each, each its own raylet): images and FaceForensics++ videos of
../shared/data/ffpp-dev come out byte-identical to the single-machine pack, and both nodes ran tasks."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from media_helpers import FFPP
from ray_helpers import TaskWatcher, assert_same_output

from helpers import make_image_dirs
from shard_tools.pack import main as pack_main

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(400)
NODE = {"num_cpus": 1, "object_store_memory": 96 * 2**20}


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_memory_monitor_refresh_ms", "0")  # the shared test machine sits near Ray's 95 % line
        c = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
        c.add_node(**NODE)
        c.wait_for_nodes()
    ray.init(address=c.address)  # check it, then leave it: the pack joins it by address, as on a real cluster
    alive = [n for n in ray.nodes() if n["Alive"]]
    ray.shutdown()
    assert len(alive) == 2 and all(n["Resources"]["CPU"] == 1 for n in alive)
    yield c
    ray.shutdown()
    c.shutdown()


def _pack_both(tmp_path: Path, address: str, real: Path, fake: Path, *extra: str) -> TaskWatcher:
    common = ["--real", str(real), "--fake", str(fake), "--shard-size", "4", "--min-shards", "2", *extra]
    assert pack_main([*common, "--out", str(tmp_path / "one"), "--workers", "1"]) == 0
    watcher = TaskWatcher()
    watcher.start()
    try:
        assert pack_main([*common, "--out", str(tmp_path / "ray"), "--ray", address]) == 0
    finally:
        watcher.stop()
    assert_same_output(tmp_path / "one", tmp_path / "ray")
    return watcher


def test_two_nodes_pack_images_identically(cluster, tmp_path):
    real, fake = make_image_dirs(tmp_path / "img", n_real=30, n_fake=30)
    _pack_both(tmp_path, cluster.address, real, fake)


@pytest.mark.slow  # ~20 s: 4 FF++ videos decoded twice, on one core each side
@pytest.mark.skipif(not FFPP.is_dir(), reason="needs ../shared/data/ffpp-dev")
def test_two_nodes_pack_ffpp_videos_identically_and_both_nodes_work(cluster, tmp_path):
    for label, names in (("real", ["044.mp4", "945.mp4"]), ("fake", ["Deepfakes_044_945.mp4", "FaceSwap_945_044.mp4"])):
        (tmp_path / label).mkdir()
        for n in names:
            shutil.copy(FFPP / label / n, tmp_path / label / n)
    watcher = _pack_both(tmp_path, cluster.address, tmp_path / "real", tmp_path / "fake", "--faces", "--frames", "2",
                         "--face-size", "64", "--group-by", "ffpp", "--val-fraction", "0.5")
    assert len({ppid for _, ppid in watcher.seen}) == 2, watcher.seen  # tasks ran under both nodes' raylets
