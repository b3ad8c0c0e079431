"""The shipped machine-learning example (examples/handlers/digits.py) through the handler pool:
a real scikit-learn fit on the digits data set, progress at its stages, and the fitted model
kept in the worker so the same call again is served warm by the same process."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sklearn.datasets import load_digits

from jobmesh.executor.handlerpool import HandlerPool
from tests.test_handlers import run_job

DIGITS = Path(__file__).resolve().parent.parent / "examples" / "handlers" / "digits.py"


@pytest.fixture(scope="module")
async def pool():
    one = HandlerPool([str(DIGITS)], workers=1)
    infos = {info.name: info for info in await one.start()}
    assert set(infos) == {"digits.train", "digits.predict", "digits.best"}
    assert infos["digits.train"].input_schema["$defs"]["TrainDigits"]["properties"]["model"]["enum"] == [
        "forest",
        "logistic",
        "svc",
    ]
    yield one
    await one.stop()


@pytest.mark.parametrize("model", ["svc", "logistic"])
async def test_training_scores_well_and_the_second_call_is_served_warm_by_the_same_worker(pool, tmp_path, model):
    cold = await run_job(pool, tmp_path / "cold", "digits.train", {"model": model, "seed": 3})
    assert cold.code is None, cold.outcome
    assert cold.result is not None and cold.result["accuracy"] > 0.9
    assert cold.result["samples"] == 1797 and cold.result["test_samples"] == 450 and not cold.result["cached"]
    assert [fraction for fraction, _ in cold.progress] == [0.1, 0.2, 0.8, 1.0]
    assert cold.progress[1][1] == f"fitting {model} on 1347 images"
    warm = await run_job(pool, tmp_path / "warm", "digits.train", {"model": model, "seed": 3})
    assert warm.code is None and warm.result is not None and warm.result["cached"]
    assert warm.result["worker_pid"] == cold.result["worker_pid"] == pool.pids()[0]
    assert warm.result["accuracy"] == cold.result["accuracy"]
    assert warm.seconds < cold.seconds
    assert warm.progress == [(1.0, f"accuracy {cold.result['accuracy']:.3f} (cached model)")]


async def test_predict_uses_the_model_the_worker_keeps(pool, tmp_path):
    trained = await run_job(pool, tmp_path / "t", "digits.train", {"model": "svc", "seed": 3})
    assert trained.code is None
    digits = load_digits()
    images = [list(map(float, row)) for row in digits.data[:20]]
    ran = await run_job(pool, tmp_path / "p", "digits.predict", {"images": images, "model": "svc", "seed": 3})
    assert ran.code is None and ran.result is not None
    assert ran.result["cached"]  # the model digits.train fitted, in this same worker
    correct = sum(int(p == t) for p, t in zip(ran.result["digits"], digits.target[:20], strict=True))
    assert correct >= 18


async def test_bad_parameters_fail_input_invalid_naming_the_field(pool, tmp_path):
    ran = await run_job(pool, tmp_path / "bad", "digits.train", {"model": "svc", "test_fraction": 1.5})
    assert ran.code == "input_invalid"
    assert ran.outcome.error.message.endswith("Expected `float` < 1.0 - at `$.runtime.input.test_fraction`")
    ran = await run_job(pool, tmp_path / "bad2", "digits.predict", {"images": [[1.0, 2.0]]})
    assert ran.code == "input_invalid"
    assert ran.outcome.error.message.endswith("Expected `array` of length >= 64 - at `$.runtime.input.images[0]`")


def test_jobmesh_dev_hosts_the_example_unless_told_otherwise(tmp_path):
    from jobmesh.dev.devcluster import dev_service_env

    reindex = DIGITS.parents[1] / "triggers" / "reindex.py"
    both = ((DIGITS, "sklearn"), (reindex, ""))
    assert dev_service_env({}, both) == {"JOBMESH_HANDLER_MODULES": f"{DIGITS},{reindex}"}
    assert dev_service_env({}) == {"JOBMESH_HANDLER_MODULES": f"{DIGITS},{reindex}"}  # the defaults
    assert dev_service_env({"JOBMESH_HANDLER_MODULES": "mine"}, both) == {}
    assert dev_service_env({}, ((DIGITS, "no_such_module_here"), (reindex, ""))) == {
        "JOBMESH_HANDLER_MODULES": str(reindex)
    }
    assert dev_service_env({}, ((tmp_path / "absent.py", ""),)) == {}  # an installed package has no examples/


async def test_the_make_run_demo_runs_the_train_and_pick_workflow_on_a_real_cluster(make_cluster, nats_server, capsys):
    from jobmesh.dev.demo import run_demo

    await make_cluster(env={"JOBMESH_HANDLER_MODULES": str(DIGITS)}, name="demo")
    await run_demo(nats_server.url, timeout=120)
    err = capsys.readouterr().err
    # The demo jobs first, then the workflow as `jobmesh workflow run` shows it off a terminal.
    assert re.search(r"^  fails  \w+  failed \(exit 3\)", err, re.M), err
    assert re.search(r"^jobmesh: workflow train-and-pick run (\w+) started \(4 steps\)$", err, re.M), err
    assert re.search(r"^jobmesh: \[ *[\d.]+s\] prep succeeded", err, re.M), err
    assert re.search(r"^jobmesh: \[ *[\d.]+s\] train running \(\d/4 items done", err, re.M), err
    assert re.search(r"^jobmesh: \[ *[\d.]+s\] train succeeded \(4/4 items done", err, re.M), err
    assert re.search(r"^jobmesh: \[ *[\d.]+s\] pick succeeded", err, re.M), err
    assert re.search(r"^jobmesh: \[ *[\d.]+s\] report skipped", err, re.M), err
    run = re.search(
        r"^jobmesh: \[ *[\d.]+s\] workflow train-and-pick run (\w+) succeeded: 3 succeeded, 1 skipped$", err, re.M
    )
    assert run, err
    best = re.search(
        r"^  best model: (svc|logistic|forest) scored 0\.9\d\d on 450 held-out images .*; ranking: (.*)$", err, re.M
    )
    assert best, err
    assert len(best[2].split(", ")) == 4 and best[2].startswith(best[1]), best[2]
    assert re.search(rf"^try: \S*jobmesh workflow status {run[1]}$", err, re.M), err


async def test_without_the_digits_handlers_the_demo_runs_the_diamond(make_cluster, nats_server, capsys):
    from jobmesh.dev.demo import run_demo

    await make_cluster(env={"JOBMESH_HANDLER_MODULES": ""}, name="demo-plain")
    await run_demo(nats_server.url, timeout=120)
    err = capsys.readouterr().err
    assert "(no executor hosts digits.train and digits.best: the demo runs diamond.yaml instead)" in err, err
    assert re.search(r"^jobmesh: \[ *[\d.]+s\] workflow diamond run (\w+) succeeded: 4 succeeded$", err, re.M), err
    assert re.search(r"^  d printed: left=60 right=60 total=120$", err, re.M), err
