"""A machine-learning handler: train and score a scikit-learn classifier on the digits data set.

``load_digits()`` ships with scikit-learn (1,797 8x8 images of hand-written digits), so
nothing is downloaded at run time. The worker imports scikit-learn and loads the data once,
when it starts; a fitted model is cached in the worker by its parameters, so a second job
with the same parameters on the same worker skips the fit (``cached`` says so).

Load it on an executor with ``JOBMESH_HANDLER_MODULES=examples/handlers/digits.py`` and call
it with ``jobmesh run --handler digits.train --input '{"model": "svc"}'``.
"""

from __future__ import annotations

import os
import time
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta
from sklearn.datasets import load_digits
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from jobmesh.sdk import Context, handler

ModelKind = Literal["svc", "logistic", "forest"]
DIGITS = load_digits()  # at import: once per worker, before its first job


class TrainDigits(msgspec.Struct, frozen=True, kw_only=True):
    """What to train: the model kind, the share of images held out to score it, the seed."""

    model: ModelKind = "svc"
    test_fraction: Annotated[float, Meta(gt=0.0, lt=1.0)] = 0.25
    seed: Annotated[int, Meta(ge=0)] = 0


class DigitsScore(msgspec.Struct, frozen=True, kw_only=True):
    """How the model scored on the held-out images, and what it cost."""

    model: ModelKind
    accuracy: float
    samples: int
    train_samples: int
    test_samples: int
    fit_seconds: float
    cached: bool
    worker_pid: int


class PredictDigits(msgspec.Struct, frozen=True, kw_only=True):
    """Images to classify (64 pixel values of 0-16 each), and the model to classify them with."""

    images: Annotated[list[Annotated[list[float], Meta(min_length=64, max_length=64)]], Meta(min_length=1)]
    model: ModelKind = "svc"
    seed: Annotated[int, Meta(ge=0)] = 0


class Predictions(msgspec.Struct, frozen=True, kw_only=True):
    """The digit predicted for each image, in order."""

    digits: list[int]
    cached: bool


class _Fitted(msgspec.Struct):
    estimator: Any
    score: DigitsScore


_models: dict[tuple[str, float, int], _Fitted] = {}


def _estimator(kind: ModelKind, seed: int) -> Any:
    if kind == "svc":
        return make_pipeline(StandardScaler(), SVC(gamma="scale", random_state=seed))
    if kind == "logistic":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    return RandomForestClassifier(n_estimators=200, random_state=seed)


def _fit(request: TrainDigits, ctx: Context | None) -> tuple[_Fitted, bool]:
    key = (request.model, request.test_fraction, request.seed)
    known = _models.get(key)
    if known is not None:
        return known, True
    if ctx is not None:
        ctx.progress(0.1, "splitting the digits data set")
    x_train, x_test, y_train, y_test = train_test_split(
        DIGITS.data, DIGITS.target, test_size=request.test_fraction, random_state=request.seed, stratify=DIGITS.target
    )
    if ctx is not None:
        ctx.progress(0.2, f"fitting {request.model} on {len(x_train)} images")
    estimator = _estimator(request.model, request.seed)
    started = time.perf_counter()
    estimator.fit(x_train, y_train)
    fit_seconds = time.perf_counter() - started
    if ctx is not None:
        if ctx.cancelled:
            raise RuntimeError("cancelled after the fit")
        ctx.progress(0.8, f"scoring on {len(x_test)} held-out images")
    score = DigitsScore(
        model=request.model,
        accuracy=float(estimator.score(x_test, y_test)),
        samples=len(DIGITS.data),
        train_samples=len(x_train),
        test_samples=len(x_test),
        fit_seconds=round(fit_seconds, 4),
        cached=False,
        worker_pid=os.getpid(),
    )
    fitted = _models[key] = _Fitted(estimator, score)
    return fitted, False


@handler("digits.train")
def train(request: TrainDigits, ctx: Context) -> DigitsScore:
    """Train a classifier on the digits data set and score it on held-out images."""
    fitted, cached = _fit(request, ctx)
    ctx.progress(1.0, f"accuracy {fitted.score.accuracy:.3f}" + (" (cached model)" if cached else ""))
    print(f"digits.train {request.model}: accuracy {fitted.score.accuracy:.4f}, cached={cached}")
    return msgspec.structs.replace(fitted.score, cached=cached, worker_pid=os.getpid())


@handler("digits.predict")
def predict(request: PredictDigits, ctx: Context) -> Predictions:
    """Classify images with the model ``digits.train`` fits (fitted here first if this worker has none)."""
    fitted, cached = _fit(TrainDigits(model=request.model, seed=request.seed), ctx)
    digits = fitted.estimator.predict(request.images)
    ctx.progress(1.0, f"classified {len(digits)} images")
    return Predictions(digits=[int(d) for d in digits], cached=cached)


class Scores(msgspec.Struct, frozen=True, kw_only=True):
    """The scores of several trained models (a workflow's fan-in: one per mapped item)."""

    scores: Annotated[list[DigitsScore], Meta(min_length=1)]


class Best(msgspec.Struct, frozen=True, kw_only=True):
    """The best of the scores, and where it ranked them all."""

    best: DigitsScore
    ranking: list[str]  # "<model> <accuracy>", best first


@handler("digits.best")
def best(request: Scores, ctx: Context) -> Best:
    """Pick the most accurate of several trained models (ties: the faster fit)."""
    ranked = sorted(request.scores, key=lambda s: (-s.accuracy, s.fit_seconds))
    print(f"digits.best: {ranked[0].model} with accuracy {ranked[0].accuracy:.4f} of {len(ranked)} models")
    return Best(best=ranked[0], ranking=[f"{s.model} {s.accuracy:.4f}" for s in ranked])
