"""``bench/bench_gpu_path.py``, the one command that measures the GPU path when a GPU is lent, runs
end to end here on the tiny model (CPU, compile mode on torch.compile's "eager" backend), through
``scripts/gpu_run.sh`` as the lent machines run it: every stage reports its figures and none an
error. Its stages record a failure and let the others go
on (a GPU run is too rare to lose to one stage), so only its results can show that it still
works: that is what this test reads, not its exit status alone."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import bench_gpu_path

ROOT = Path(__file__).resolve().parents[1]


def errors(node: Any, where: str = "") -> list[str]:
    """Every ``error`` a stage recorded, with where it is in the results."""
    if isinstance(node, dict):
        found = [f"{where}: {node['error']}"] if "error" in node else []
        return found + [e for k, v in node.items() for e in errors(v, f"{where}/{k}")]
    if isinstance(node, list):
        return [e for i, v in enumerate(node) for e in errors(v, f"{where}[{i}]")]
    return []


def probe_wheel(folder: Path) -> Path:
    """A one-module wheel, standing for the ones ``scripts/gpu_wheels.sh`` downloads."""
    files = {
        "gpu_run_probe.py": b"VALUE = 42\n",
        "gpu_run_probe-1.0.dist-info/METADATA":
            b"Metadata-Version: 2.1\nName: gpu-run-probe\nVersion: 1.0\n",
        "gpu_run_probe-1.0.dist-info/WHEEL":
            b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()}"
        f",{len(data)}\n" for name, data in files.items())
    record += "gpu_run_probe-1.0.dist-info/RECORD,,\n"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "gpu_run_probe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("gpu_run_probe-1.0.dist-info/RECORD", record)
    return path


def gpu_run(tmp_path: Path, wheels: Path, *args: str) -> subprocess.CompletedProcess:
    """``scripts/gpu_run.sh`` as a lent machine runs it, its ``python3`` this test's."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
           "WHEELS": str(wheels), "SITE": str(tmp_path / "site"), "OUT": str(tmp_path / "out"),
           "GPU_RUN_TIMEOUT_S": "500"}
    return subprocess.run(["bash", "scripts/gpu_run.sh", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_without_its_wheels_the_gpu_script_says_how_to_get_them(tmp_path):
    (tmp_path / "none").mkdir()
    run = gpu_run(tmp_path, tmp_path / "none", "--tiny")
    assert run.returncode == 1
    assert "no wheels in" in run.stderr and "scripts/gpu_wheels.sh" in run.stderr
    assert not (tmp_path / "out" / "gpu_path.json").exists()


def test_the_gpu_script_runs_every_stage_of_the_benchmark_on_the_tiny_model(tmp_path):
    """Through ``scripts/gpu_run.sh``, the one command a lent GPU machine runs: it installs the
    carried wheels, records the machine, runs the benchmark and leaves its files in $OUT."""
    run = gpu_run(tmp_path, probe_wheel(tmp_path / "whl").parent, "--tiny", "--device", "cpu",
                  "--buckets", "1,2", "--repeats", "1", "--compile-buckets", "1",
                  "--sessions", "1", "--seconds", "1", "--doc", str(tmp_path / "unused.md"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = tmp_path / "out"
    assert (tmp_path / "site" / "gpu_run_probe.py").is_file()  # the wheels, beside the machine's
    assert torch.__version__ in (out / "machine.txt").read_text()
    assert (out / "log.txt").stat().st_size > 0 and (out / "bench_musetalk.md").is_file()
    res = json.loads((out / "gpu_path.json").read_text())
    assert errors(res) == [], errors(res)
    assert res["label"] == "tiny (test model)" and res["graph_mode"] == "compile"
    assert res["complete"] is True and res["elapsed_s"] > 0
    for decoder in ("sd-vae", "taesd"):
        rows = res["graphs"][decoder]["rows"]
        assert [r["bucket"] for r in rows] == [1, 2]
        assert all(r["graph_ms"] > 0 and r["eager_ms"] > 0 for r in rows)
        assert all(r["max_abs_diff"] <= 1 for r in rows), rows  # uint8 levels, graph vs eager
        (compiled,) = [c for c in res["compile"] if c["decoder"] == decoder]
        assert compiled["compile_counts"] == {"1": 1} and compiled["dynamic_counts"] == {"1": 0}
        assert compiled["one_static_graph_each"] is True
        stream = res["streaming"][f"{decoder}/1"]
        assert stream["sessions"] == 1 and stream["frames"] > 0 and stream["batches"] > 0
        assert stream["fps_out_min"] > 0 and stream["p95_ms"] >= stream["p50_ms"] > 0
        assert res["goals"][decoder]["bucket"] == 2 and res["goals"][decoder]["fps"] > 0
    assert not (tmp_path / "unused.md").exists()  # the doc's GPU section is written on CUDA only

    # what a GPU run writes: its section between the markers, the rest of the doc kept
    doc = tmp_path / "bench_musetalk.md"
    doc.write_text(f"# head\n\nkept above\n\n{bench_gpu_path.START}\nstale figures\n"
                   f"{bench_gpu_path.END}\n\nkept below\n")
    bench_gpu_path.write_doc(doc, res)
    text = doc.read_text()
    assert "stale figures" not in text and "kept above" in text and "kept below" in text
    assert text.count(bench_gpu_path.START) == 1 and text.count(bench_gpu_path.END) == 1
    assert "## GPU path (issue 21)" in text and "| sd-vae/1 |" in text and "| taesd | 2 |" in text


def test_a_given_face_box_builds_the_avatar_detection_builds_without_a_detector(monkeypatch):
    """The GPU machine's OpenCV 5 has no face detector: the benchmark gives the astronaut's
    face box, and the avatar is the one detection makes here."""
    from skimage import data as skdata

    from websocket_service.avatars import store
    from websocket_service.avatars.face import FaceDetectorUnavailable, detect_face

    photo = skdata.astronaut()
    assert detect_face(photo) == bench_gpu_path.ASTRONAUT_FACE
    detected = store.build_avatar("a", [photo], True, 128, 128)

    def no_detector(_rgb):
        raise FaceDetectorUnavailable("OpenCV 5")

    monkeypatch.setattr(store, "detect_face", no_detector)
    given = store.build_avatar("a", [photo], True, 128, 128, face_box=bench_gpu_path.ASTRONAUT_FACE)
    assert given.meta["face_box"] == detected.meta["face_box"]
    assert given.meta["crop_box"] == detected.meta["crop_box"]
    assert given.meta["report"]["face_given"] is True
    assert sorted(given.clips) == sorted(detected.clips)
    assert all(np.array_equal(given.clips[n].frames, detected.clips[n].frames) for n in given.clips)
