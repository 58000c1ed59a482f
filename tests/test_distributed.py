"""Sharded certification on torch.distributed (gloo on CPU): the certificate is the same for
any number of processes, a failing process fails the run on every process with its error and
nothing is written, and processes that cannot join time out with a clear message. Also: out
of memory halves the batch and retries, and a model that fits at no batch size is refused."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import robust_cert
from robust_cert import engine
from robust_cert.data import digits_split
from robust_cert.errors import ModelError
from robust_cert.policy import load_policy

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "shard_worker.py"
sys.path.insert(0, str(ROOT / "tests"))
from shard_worker import POINTS, small_cnn  # noqa: E402

#: 40 points at batch 16: three blocks (16, 16, 8 for the pointwise families, 14, 13, 13 for
#: those that draw per batch), so 4 processes leave one idle.
POLICY = {
    "name": "shard", "version": "1", "batch_size": 16, "confidence": 0.95,
    "metrics": {
        "accuracy": {},
        "robust_accuracy": {"eps": [0.0, 0.1], "attacks": ["pgd", "square"], "steps": 3,
                            "square_queries": 20},
        "probabilistic_robustness": {"eps": 0.1, "samples": 200},
        "calibration": {"bins": 5, "thresholds": [0.9]},
        "corruptions": {"corruptions": ["gaussian_noise", "contrast"], "severities": [1, 3]},
        "randomized_smoothing": {"sigma": 0.12, "n0": 16, "n": 64, "alpha": 0.05,
                                 "radii": [0.0, 0.05]},
    },
    "requirements": [
        {"metric": "accuracy", "at_least": 0.5},
        {"metric": "robust_accuracy", "eps": 0.1, "at_least": 0.05},
        {"metric": "probabilistic_robustness", "eps": 0.1, "at_most": 0.5},
    ],
}

#: what differs between two runs by design: the time of issue, and how many processes ran
VARIES = {("issued_at",), ("environment", "processes")}


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = small_cnn()
    x, y = (torch.tensor(a) for a in digits_split("train"))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    path = tmp_path_factory.mktemp("shard") / "state.pt"
    torch.save(model.state_dict(), path)
    return path


def _launch(nproc: int, state: Path, out: Path, policy: dict = POLICY, *extra: str,
            timeout: float = 300) -> subprocess.CompletedProcess:
    pol = out.parent / f"{out.name}-policy.json"
    pol.parent.mkdir(parents=True, exist_ok=True)
    pol.write_text(json.dumps(policy))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc-per-node={nproc}", str(WORKER), str(state), str(pol), str(out), *extra],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _strip(body: dict) -> dict:
    body = json.loads(json.dumps(body))
    for path in VARIES:
        node = body
        for key in path[:-1]:
            node = node[key]
        node.pop(path[-1])
    return body


@pytest.mark.integration
def test_certificate_is_identical_for_1_2_3_and_4_processes(state, tmp_path):
    """World sizes 1, 2, 3 and 4 (more processes than the three blocks: one idle) give the same
    certificate — every result, requirement and verdict — and the same per-point arrays."""
    runs = {}
    for nproc in (1, 2, 3, 4):
        done = _launch(nproc, state, tmp_path / f"ws{nproc}")
        assert done.returncode == 0, done.stderr[-3000:]
        body = json.loads((tmp_path / f"ws{nproc}" / "certificate.json").read_text())
        assert body["environment"]["processes"] == nproc
        with np.load(tmp_path / f"ws{nproc}" / "per_point.npz") as arrays:
            runs[nproc] = (body, {k: arrays[k] for k in arrays.files})
    base_body, base_points = runs[1]
    assert [r["metric"] for r in base_body["results"]] == list(POLICY["metrics"])
    assert base_body["data"]["n"] == POINTS
    for nproc in (2, 3, 4):
        body, points = runs[nproc]
        assert _strip(body) == _strip(base_body), f"{nproc} processes"
        assert points.keys() == base_points.keys()
        for key, arr in base_points.items():
            np.testing.assert_array_equal(points[key], arr, err_msg=f"{nproc}: {key}")


@pytest.mark.integration
def test_a_failing_process_fails_the_run_and_nothing_is_written(state, tmp_path):
    done = _launch(2, state, tmp_path / "fail", POLICY, "--fail-rank", "1")
    assert done.returncode != 0
    # rank 0 raises the error of rank 1, with the layer and the cause
    assert "process 1 of 2 failed" in done.stderr, done.stderr[-3000:]
    assert "injected failure on rank 1" in done.stderr
    assert not (tmp_path / "fail" / "certificate.json").exists()
    assert not (tmp_path / "fail").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_a_process_that_cannot_join_times_out_with_a_clear_message(state, tmp_path):
    """Rank 0 of a declared world of 2, started alone: the join times out and says where."""
    port = _free_port()
    pol = tmp_path / "policy.json"
    pol.write_text(json.dumps(POLICY))
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "ROBUST_CERT_JOIN_TIMEOUT": "3"}
    done = subprocess.run([sys.executable, str(WORKER), str(state), str(pol),
                           str(tmp_path / "out")], capture_output=True, text=True, env=env,
                          timeout=120, cwd=ROOT)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert f"process 0 of 2 could not join the others at 127.0.0.1:{port} within 3 s" in last
    assert "ROBUST_CERT_JOIN_TIMEOUT" in last
    assert not (tmp_path / "out").exists()


class _NeedsSmallBatches(nn.Module):
    """Raises torch's out-of-memory error on batches larger than ``limit`` (what a GPU does)."""

    def __init__(self, inner: nn.Module, limit: int):
        super().__init__()
        self.inner, self.limit = inner, limit

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {x.shape[0] * 4} MiB")
        return self.inner(x)


def _memory_policy(batch: int):
    return load_policy({"name": "mem", "version": "1", "batch_size": batch,
                        "metrics": {"accuracy": {}},
                        "requirements": [{"metric": "accuracy", "at_least": 0.5}]})


def _trained(state: Path):
    """The trained small CNN (one thread) and the first POINTS digits test points."""
    torch.set_num_threads(1)
    model = small_cnn()
    model.load_state_dict(torch.load(state))
    x, y = digits_split("test")
    return model, robust_cert.data.load_data((x[:POINTS], y[:POINTS]))


def test_out_of_memory_halves_the_batch_retries_and_records_it(state):
    model, data = _trained(state)
    plain = engine.run_suite(robust_cert.load_model(model, input_shape=(1, 8, 8)), data,
                             _memory_policy(32), progress=False)["accuracy"]
    clf = robust_cert.load_model(_NeedsSmallBatches(model, 8), input_shape=(1, 8, 8))
    res = engine.run_suite(clf, data, _memory_policy(32), progress=False)["accuracy"]
    assert res.proportions[0].k == plain.proportions[0].k
    np.testing.assert_array_equal(res.per_point["prediction"], plain.per_point["prediction"])
    # accuracy is pointwise: one process runs its 40 points in one call, batch 32 → 16 → 8
    assert [r["batch_size"] for r in res.diagnostics["memory_retries"]] == [16, 8]
    assert res.diagnostics["memory_retries"][0]["stage"] == f"accuracy (points 0-{POINTS - 1})"
    assert "memory_retries" not in plain.diagnostics


class _Recording(nn.Module):
    """Records the batch size of every forward call."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.sizes = inner, []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        return self.inner(x)


#: randomized smoothing gathers up to max_forward_images (here 512) noisy images per pass
_SMOOTHING = {"sigma": 0.12, "n0": 16, "n": 128, "alpha": 0.05, "radii": [0.0, 0.05],
              "max_forward_images": 512}


def _smoothing_policy(batch: int):
    return load_policy({"name": "mem", "version": "1", "batch_size": batch,
                        "metrics": {"randomized_smoothing": _SMOOTHING},
                        "requirements": [{"metric": "randomized_smoothing", "radius": 0.05,
                                          "at_least": 0.0}]})


def test_cpu_forward_passes_take_at_most_batch_size_images(state):
    """On CPU the engine caps every forward pass at the policy's batch_size, or 64 when it
    is smaller (passes of max_forward_images images run at under half the throughput
    there, tiny ones waste it): the smoothing counts are those of uncut passes (the logits
    of a row do not depend on its batch)."""
    model, data = _trained(state)
    rec = _Recording(model)
    clf = robust_cert.load_model(rec, input_shape=(1, 8, 8))
    for batch, cap in ((100, 100), (16, engine.CPU_MIN_FORWARD)):
        rec.sizes.clear()
        engine.run_suite(clf, data, _smoothing_policy(batch), progress=False)
        assert rec.sizes
        assert max(rec.sizes) == cap
    rec.sizes.clear()
    capped = engine.run_suite(clf, data, _smoothing_policy(16), progress=False)
    rec.sizes.clear()
    uncut = engine.run_suite(dataclasses.replace(clf, max_batch=10**9), data,
                             _smoothing_policy(16), progress=False)
    assert max(rec.sizes) == 512  # max_forward_images per pass when nothing caps it
    a, b = capped["randomized_smoothing"], uncut["randomized_smoothing"]
    _same_up_to_rounding(a, b)


def _same_up_to_rounding(a, b):
    """The same noise gives the same counts, except where float rounding of a different
    batch size moves an argmax at a near-tie: allow one point in 40 to differ (a logits
    split in the wrong order would change most of them)."""
    differ = a.per_point["p_lower"] != b.per_point["p_lower"]
    assert differ.sum() <= 1, differ.sum()
    assert all(abs(p.k - q.k) <= 1 for p, q in zip(a.proportions, b.proportions, strict=True))


def test_out_of_memory_caps_the_large_forward_passes_of_probabilistic_metrics(state):
    """Out of memory in a pass of max_forward_images noisy images (no cap before, as on
    CUDA): halving the batch also caps the passes, so the retry fits. The retried block
    draws its noise for chunks of 16 points instead of 40 (recorded in memory_retries), so
    the certificate is a valid one of the same smoothed classifier, not the same draws."""
    model, data = _trained(state)
    plain = engine.run_suite(robust_cert.load_model(model, input_shape=(1, 8, 8)), data,
                             _smoothing_policy(64), progress=False)["randomized_smoothing"]
    tight = _NeedsSmallBatches(model, 20)
    rec = _Recording(tight)
    clf = robust_cert.load_model(rec, input_shape=(1, 8, 8))
    clf = dataclasses.replace(clf, max_batch=10**9)  # uncapped, as on CUDA
    rec.sizes.clear()
    res = engine.run_suite(clf, data, _smoothing_policy(64),
                           progress=False)["randomized_smoothing"]
    # 40 points in one block: 64 → 32 → 16 (passes of 16 images fit under 20)
    assert [r["batch_size"] for r in res.diagnostics["memory_retries"]] == [32, 16]
    assert rec.sizes[0] > 20
    assert max(rec.sizes[-10:]) <= 16
    # the smoothed classifier's prediction at n0 = 16 draws, abstentions aside
    agree = (res.per_point["prediction"] == plain.per_point["prediction"]).mean()
    assert agree >= 0.9, agree


def test_a_model_that_does_not_fit_at_batch_1_is_a_clear_error(state):
    """Out of memory at batch 1 inside a metric, and on the first forward pass: one line
    naming the device, the failed allocation and the model's size."""
    model = small_cnn()
    size = sum(p.numel() * 4 for p in model.parameters())
    clf = robust_cert.load_model(_NeedsSmallBatches(model, 2), input_shape=(1, 8, 8))
    clf = dataclasses.replace(clf, forward=_NeedsSmallBatches(model, 0))
    x, y = digits_split("test")
    data = robust_cert.data.load_data((x[:20], y[:20]))
    with pytest.raises(ModelError) as err:
        engine.run_suite(clf, data, _memory_policy(16), progress=False)
    msg = str(err.value)
    assert msg.startswith("accuracy (points 0-19): the model does not fit in the memory of cpu "
                          "even at batch size 1 (CUDA out of memory. Tried to allocate 4 MiB")
    assert f"its parameters and buffers alone take {size / 2**20:.1f} MiB" in msg
    assert "\n" not in msg
    with pytest.raises(ModelError, match="the first forward pass: the model does not fit in "
                                         "the memory of cpu even at batch size 1"):
        robust_cert.load_model(_NeedsSmallBatches(model, 0), input_shape=(1, 8, 8))


def test_share_gives_every_block_to_exactly_one_process():
    from robust_cert.distributed import World

    for blocks in (0, 1, 2, 3, 7, 10):
        for size in (1, 2, 3, 4, 5):
            shares = [World(rank=r, size=size).share(blocks) for r in range(size)]
            assert [b for s in shares for b in s] == list(range(blocks))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.integration
def test_torchrun_certify_cli_writes_once_from_rank_0(mlflow_server, state, tmp_path):
    """``torchrun -m robust_cert certify --estimate`` against a real MLflow server: the
    estimate, one certification run, the version's tags and the report, all from rank 0."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from robust_cert.mlflow_plugin.names import RUN_ID_TAG

    mlflow.set_tracking_uri(mlflow_server.url)
    mlflow.set_registry_uri(mlflow_server.url)
    model = small_cnn()
    model.load_state_dict(torch.load(state))
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(model, name="m",
                                        input_example=np.zeros((2, 1, 8, 8), np.float32),
                                        serialization_format="pickle",
                                        registered_model_name="sharded-cnn",
                                        pip_requirements=["torch"])
    version = str(info.registered_model_version)
    policy = tmp_path / "p.json"  # JSON is YAML
    policy.write_text(json.dumps({**POLICY, "batch_size": 128, "metrics": {
        "accuracy": {}, "robust_accuracy": {"eps": [0.1], "attacks": ["pgd"], "steps": 3}},
        "requirements": [{"metric": "accuracy", "at_least": 0.5}]}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "ROBUST_CERT_SIGNING_KEY", "ROBUST_CERT_SIGNING_KEY_FILE"):
        env.pop(key, None)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "robust_cert", "certify", f"models:/sharded-cnn/{version}", "--policy",
         str(policy), "--tracking-uri", mlflow_server.url, "--out", str(tmp_path / "out"),
         "--no-progress", "--estimate"], capture_output=True, text=True, timeout=600, env=env,
        cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    # the estimate, made once by rank 0, for the busiest of the 2 processes
    assert done.stderr.count("estimated cost (pilot run)") == 1
    assert "359 points on 2 processes" in done.stderr
    assert done.stdout.count(f"models:/sharded-cnn/{version}: PASS") == 1  # rank 0 reports
    body = json.loads((tmp_path / "out" / "certificate.json").read_text())["certificate"]
    assert body["environment"]["processes"] == 2
    assert body["data"]["n"] == 359
    client = MlflowClient(mlflow_server.url, mlflow_server.url)
    mv = client.get_model_version("sharded-cnn", version)
    runs = client.search_runs([client.get_run(mv.tags[RUN_ID_TAG]).info.experiment_id],
                              "tags.`robust_cert.kind` = 'certification' and "
                              "tags.`robust_cert.model` = 'sharded-cnn' and "
                              f"tags.`robust_cert.version` = '{version}'")
    assert [r.info.run_id for r in runs] == [mv.tags[RUN_ID_TAG]]  # one run, by rank 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_uses_pinned_inputs_and_agrees_with_cpu(state, monkeypatch):
    """On CUDA the engine pins the inputs (async copies) and the predictions agree with the
    CPU's wherever the CPU's top-2 logit gap exceeds float32 reduction-order differences."""
    model = small_cnn()
    model.load_state_dict(torch.load(state))
    x, y = digits_split("test")
    data = robust_cert.data.load_data((x[:POINTS], y[:POINTS]))
    pinned = []
    real = engine._subset

    def spy(d, block):
        pinned.append(d.x.is_pinned())
        return real(d, block)

    monkeypatch.setattr(engine, "_subset", spy)
    cuda = engine.run_suite(robust_cert.load_model(model, input_shape=(1, 8, 8), device="cuda"),
                            data, _memory_policy(16), progress=False)["accuracy"]
    assert pinned
    assert all(pinned)
    cpu_model = small_cnn()
    cpu_model.load_state_dict(torch.load(state))
    with torch.no_grad():
        top2 = cpu_model(torch.tensor(x[:POINTS])).topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1] > 1e-3).numpy()
    cpu = engine.run_suite(robust_cert.load_model(cpu_model, input_shape=(1, 8, 8)), data,
                           _memory_policy(16), progress=False)["accuracy"]
    np.testing.assert_array_equal(cuda.per_point["prediction"][clear],
                                  cpu.per_point["prediction"][clear])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL)")
@pytest.mark.integration
def test_two_gpus_give_the_certificate_of_one(state, tmp_path):
    """NCCL default group, one GPU per process: the same certificate as one process."""
    one = _launch(1, state, tmp_path / "g1")
    two = _launch(2, state, tmp_path / "g2")
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "g1" / "certificate.json").read_text())
    b = json.loads((tmp_path / "g2" / "certificate.json").read_text())
    assert b["environment"]["device"] == "cuda:0"
    assert _strip(a) == _strip(b)
