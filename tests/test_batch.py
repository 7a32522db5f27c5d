"""Tests of the batch runner: pipeline threads, failures, rank sharding and the merge of rank results."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mbmamba_cli.inference import batch
from mbmamba_cli.inference.batch import (
    BatchSetupError,
    DeblurRequest,
    FileResult,
    merge_rank_results,
    run_batch,
)
from mbmamba_cli.inference.distributed import DeviceError, DistContext, context_from_env, resolve_device

REPO = Path(__file__).resolve().parents[1]


class FakeDeblurrer:
    """Inverts images; fails on images `fail_width` pixels wide; optionally slow."""

    def __init__(self, fail_width: int | None = None, delay: float = 0.0) -> None:
        self.fail_width = fail_width
        self.delay = delay
        self.calls = 0

    def deblur(self, pixels: np.ndarray) -> np.ndarray:
        self.calls += 1
        time.sleep(self.delay)
        if pixels.shape[1] == self.fail_width:
            raise RuntimeError("model exploded")
        return 1.0 - pixels


def factory_of(deblurrer: FakeDeblurrer):
    def create(**options):
        return deblurrer

    return create


def write_images(folder: Path, count: int, width: int = 20) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        pixels = np.full((12, width, 3), index * 10, dtype=np.uint8)
        path = folder / f"img{index:02d}.png"
        Image.fromarray(pixels, "RGB").save(path)
        paths.append(path)
    return paths


class Recorder:
    """A BatchObserver that records the planned total, the results and the threads that sent them."""

    def __init__(self) -> None:
        self.total: int | None = None
        self.results: list[FileResult] = []
        self.threads: set[str] = set()

    def planned(self, total: int) -> None:
        self.total = total

    def finished(self, result: FileResult) -> None:
        self.results.append(result)
        self.threads.add(threading.current_thread().name)


def test_batch_all_done(tmp_path: Path) -> None:
    write_images(tmp_path / "in", 5)
    recorder = Recorder()

    summary = run_batch(
        DeblurRequest(str(tmp_path / "in"), tmp_path / "out"),
        recorder,
        deblurrer_factory=factory_of(FakeDeblurrer()),
    )

    assert summary.count("done") == 5
    assert summary.exit_code == 0
    assert recorder.total == 5
    assert len(recorder.results) == 5
    assert [Path(r.input).name for r in summary.results] == [f"img{i:02d}.png" for i in range(5)]
    assert all(r.seconds > 0 for r in summary.results)


def test_batch_failure_continues(tmp_path: Path) -> None:
    write_images(tmp_path / "in", 3)
    write_images(tmp_path / "in" / "wide", 1, width=33)
    (tmp_path / "in" / "wide" / "img00.png").rename(tmp_path / "in" / "img99.png")
    (tmp_path / "in" / "img50.png").write_bytes(b"\x89PNG truncated")
    deblurrer = FakeDeblurrer(fail_width=33)

    summary = run_batch(
        DeblurRequest(str(tmp_path / "in"), tmp_path / "out"), deblurrer_factory=factory_of(deblurrer)
    )
    errors = {Path(r.input).name: r.error for r in summary.failures}

    assert summary.count("done") == 3
    assert summary.exit_code == 1
    assert "model exploded" in errors["img99.png"]
    assert "img50.png" in errors["img50.png"]
    assert deblurrer.calls == 4  # the unreadable file never reached the model


def test_batch_write_failure_continues(tmp_path: Path) -> None:
    write_images(tmp_path / "in", 2)
    (tmp_path / "out" / "img00.png").mkdir(parents=True)  # a folder where the output file should go

    summary = run_batch(
        DeblurRequest(str(tmp_path / "in"), tmp_path / "out"), deblurrer_factory=factory_of(FakeDeblurrer())
    )

    assert [r.status for r in summary.results] == ["failed", "done"]
    assert "img00.png" in summary.results[0].error


def test_prefetch_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mbmamba_cli.io import images

    write_images(tmp_path / "in", 8)
    reads = []
    real_read = images.read_image
    monkeypatch.setattr(images, "read_image", lambda path: reads.append(path) or real_read(path))
    ahead = []

    class Watching(FakeDeblurrer):
        def deblur(self, pixels: np.ndarray) -> np.ndarray:
            ahead.append(len(reads) - self.calls - 1)
            return super().deblur(pixels)

    request = DeblurRequest(str(tmp_path / "in"), tmp_path / "out", prefetch=2)
    run_batch(request, deblurrer_factory=factory_of(Watching(delay=0.05)))

    assert max(ahead) <= 2 + 1  # the queue plus the one image the reader keeps while it waits
    assert max(ahead) >= 1  # the reader does run ahead of the model


def test_setup_error_from_factory(tmp_path: Path) -> None:
    write_images(tmp_path / "in", 1)

    def broken_factory(**options):
        raise ValueError("device 'cuda:7' does not exist")

    with pytest.raises(BatchSetupError, match="cuda:7"):
        run_batch(DeblurRequest(str(tmp_path / "in"), tmp_path / "out"), deblurrer_factory=broken_factory)


def test_thread_crash_reraised(tmp_path: Path) -> None:
    write_images(tmp_path / "in", 3)

    class Crashing(Recorder):
        def finished(self, result: FileResult) -> None:
            raise KeyError("observer bug")

    with pytest.raises(KeyError, match="observer bug"):
        run_batch(
            DeblurRequest(str(tmp_path / "in"), tmp_path / "out"),
            Crashing(),
            deblurrer_factory=factory_of(FakeDeblurrer()),
        )


def test_merge_rank_results_order() -> None:
    rank0 = [FileResult(0, "a", "A", "done"), FileResult(2, "c", "C", "failed", error="bad")]
    rank1 = [FileResult(1, "b", "B", "skipped"), FileResult(3, "d", "D", "done")]

    summary = merge_rank_results([rank0, rank1], seconds=1.5)

    assert [r.input for r in summary.results] == ["a", "b", "c", "d"]
    assert summary.to_json() == {"done": 2, "skipped": 1, "failed": 1, "seconds": 1.5}
    assert summary.exit_code == 1


def test_merge_rank_results_duplicates_rejected() -> None:
    with pytest.raises(ValueError, match="same files"):
        merge_rank_results([[FileResult(0, "a", "A", "done")], [FileResult(0, "a", "A", "done")]], 1.0)


def test_shard_strides() -> None:
    items = list(range(7))

    shares = [DistContext(rank, 3, rank).shard(items) for rank in range(3)]

    assert shares == [[0, 3, 6], [1, 4], [2, 5]]


def test_context_from_env() -> None:
    assert context_from_env({}) == DistContext(0, 1, 0)
    assert context_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == DistContext(3, 4, 1)
    with pytest.raises(ValueError, match="RANK=4"):
        context_from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="torchrun"):
        context_from_env({"WORLD_SIZE": "two"})


def test_rank_share_only_own_files(tmp_path: Path) -> None:
    write_images(tmp_path / "in", 5)
    deblurrer = FakeDeblurrer()
    context = DistContext(rank=1, world_size=2, local_rank=1)
    planned = batch.plan_jobs(DeblurRequest(str(tmp_path / "in"), tmp_path / "out"))

    results = batch._run_jobs(
        DeblurRequest(str(tmp_path / "in"), tmp_path / "out"),
        context.shard(planned),
        batch.BatchObserver(),
        factory_of(deblurrer),
        context,
    )

    assert [Path(r.input).name for r in results] == ["img01.png", "img03.png"]
    assert deblurrer.calls == 2


_RANK_SCRIPT = """
import json, sys
from pathlib import Path
from mbmamba_cli.inference.batch import DeblurRequest, run_batch

class Invert:
    def deblur(self, pixels):
        return 1.0 - pixels

summary = run_batch(DeblurRequest(sys.argv[1], Path(sys.argv[2])), deblurrer_factory=lambda **o: Invert())
print(json.dumps({"merged": summary.merged, "inputs": [Path(r.input).name for r in summary.results],
                  "statuses": [r.status for r in summary.results], "exit": summary.exit_code}))
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_gloo_merge(tmp_path: Path) -> None:
    write_images(tmp_path / "in", 5)
    (tmp_path / "in" / "img02.png").write_bytes(b"broken")
    port = _free_port()
    processes = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        )
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", _RANK_SCRIPT, str(tmp_path / "in"), str(tmp_path / "out")],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    reports = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]

    assert [process.returncode for process in processes] == [0, 0], outputs
    assert reports[0]["merged"] is True
    assert reports[0]["inputs"] == [f"img{i:02d}.png" for i in range(5)]
    assert reports[0]["statuses"] == ["done", "done", "failed", "done", "done"]
    assert reports[0]["exit"] == 1
    assert reports[1]["merged"] is False
    assert reports[1]["inputs"] == ["img01.png", "img03.png"]
    assert reports[1]["exit"] == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "img00.png",
        "img01.png",
        "img03.png",
        "img04.png",
    ]


def test_resolve_device_cpu_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(DeviceError, match="CUDA is not available"):
        resolve_device("cuda:0")
    with pytest.raises(DeviceError, match="invalid device"):
        resolve_device("tpu")


def test_cpu_only_build_with_driver_warned(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import shutil

    import torch

    monkeypatch.setattr(logging.getLogger("mbmamba"), "propagate", True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/nvidia-smi")

    with caplog.at_level(logging.WARNING):
        resolve_device("auto")

    assert "CPU-only build" in caplog.text
