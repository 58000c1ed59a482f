"""The public entry points: load a model, load data, certify."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import platform
from datetime import datetime, timezone

import torch
from torch import nn

from robust_cert import devices, distributed, engine, verdict
from robust_cert.certificate import SCHEMA, Certificate, library_versions, result_to_dict
from robust_cert.data import EvalSet, check_fits, load_data
from robust_cert.errors import DataError, ModelError, PolicyError
from robust_cert.loaders import load_model
from robust_cert.metrics.base import MetricResult
from robust_cert.models.base import Classifier
from robust_cert.models.blackbox import check_columns
from robust_cert.models.diagnose import model_failures, model_parts
from robust_cert.models.torch import preserved_modes
from robust_cert.models.twin import DEFAULT_TWIN_TOLERANCE, with_gradient_twin
from robust_cert.policy import Policy, load_policy
from robust_cert.verdicts import Verdict

log = logging.getLogger(__name__)

DECISION_RULE = (
    "Each requirement is an exact one-sided binomial test of 'requirement violated'; "
    "Holm's step-down procedure at alpha = 1 - confidence across all requirements. PASS when "
    "rejected (the one-sided Clopper-Pearson bound at the Holm level clears the threshold), "
    "FAIL when the opposite bound excludes the threshold, else INCONCLUSIVE. The overall "
    "verdict is PASS only if every requirement passes."
)


def _restores_modes(fn):
    """Run ``fn(model, …)`` and give an ``nn.Module`` model (and gradient twin) back in the
    training mode it came in (every submodule's flag), also when certification raises."""
    import functools

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        with preserved_modes(model), preserved_modes(kwargs.get("gradient_twin")):
            return fn(model, *args, **kwargs)

    return wrapper


@_restores_modes
def certify(
    model,
    data,
    policy,
    *,
    device: str | torch.device | None = None,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
    command: str | None = None,
    gradient_twin=None,
    twin_tolerance: float = DEFAULT_TWIN_TOLERANCE,
    announce=None,
) -> Certificate | None:
    """Run ``policy``'s metric suite on ``model`` and ``data`` and decide every requirement.

    ``model``: anything :func:`robust_cert.loaders.load_model` accepts — an ``nn.Module``, an
    ``.onnx`` path, a loaded Classifier, and with the MLflow plugin ``models:/NAME/VERSION``,
    ``models:/NAME@ALIAS``, ``models:/m-ID`` or ``runs:/RUN_ID/PATH``.
    ``data``: ``"digits"``, an ``.npz`` path, ``(x, y)`` arrays/tensors, or an EvalSet.
    ``policy``: YAML path, dict, or Policy. Returns an unsigned Certificate; nothing is written
    anywhere. The verdict's family-wise error is at most 1 − policy.confidence (see
    :mod:`robust_cert.verdict`).

    ``gradient_twin`` (anything :func:`load_model` accepts) is a differentiable model for a
    model without gradients (ONNX), typically the PyTorch model it was exported from. Before
    anything runs it must predict the same class on every evaluation point with max |Δ logit|
    ≤ ``twin_tolerance`` (default 1e-3), else ModelError names the disagreement. Gradient
    metrics then craft attacks on the twin and judge them on the deployed model; every other
    prediction stays on the model. The certificate's ``model.gradient_twin`` records it. A
    parity metric with ``reference: twin`` compares with it. A differentiable model keeps its
    own gradients; its twin then serves only as that parity reference.

    Sanity checks decide (``certificate.sanity.checks``: each passed, failed or not run). A
    model that is random at evaluation time makes every requirement INCONCLUSIVE unless the
    policy declares ``model: {stochastic: true}``; then every forward pass is seeded from
    ``seed`` (runs reproduce) and the guarantees are about the random classifier. A model
    returning probabilities is refused (ModelError) unless the policy declares ``model:
    {outputs: probabilities}``. A failed check of a metric (e.g. gradient masking under
    attack) makes the requirements it undermines INCONCLUSIVE, unless compensated or waived
    by the policy (``waive: [{check, reason}]``); see :func:`robust_cert.verdict.apply_sanity`.
    An ``nn.Module`` is evaluated in eval mode and given back in its own training mode; its
    parameters and buffers are not modified.

    ``announce``: a callable given the cost estimate (:class:`robust_cert.plan.Plan`, a pilot
    run on a few points) before the real run starts; the progress bar then counts estimated
    seconds, so its ETA is the estimate's. A policy's ``time_budget_s`` makes the same
    estimate and refuses (PolicyError) a run estimated over budget before anything runs.

    Launched by ``torchrun`` (``WORLD_SIZE`` > 1), every process calls this with the same
    arguments: shardable metrics' blocks of points are spread over the processes (each on its
    local GPU when ``device`` is auto and CUDA is present), rank 0 returns the Certificate —
    the same as a single process's but for ``issued_at`` and ``environment.processes`` — and
    the other ranks return None. An error on any process raises on all of them.
    """
    pol: Policy = load_policy(policy)
    world = distributed.world()
    device = distributed.device_for(world, device)
    n_threads = devices.configure_threads(threads)
    evalset: EvalSet = load_data(data, input_range=pol.data_range)
    if pol.features is None and tuple(evalset.input_range) != tuple(pol.input_range):
        log.info("data input range %s differs from the policy's %s; using the data's",
                 evalset.input_range, pol.input_range)
    try:
        clf = load_model(model, input_shape=evalset.input_shape, device=device)
    except ModelError as exc:
        if not isinstance(model, nn.Module):
            raise
        raise DataError(f"the model does not accept data samples of shape "
                        f"{evalset.input_shape}: {exc}") from exc
    check_fits(evalset, clf.input_shape, clf.num_classes)
    check_columns(clf, evalset.details.get("features"), evalset.source)
    threat = feature_threat(pol, evalset)
    if threat is None:
        check_radii(pol, evalset)
    for name in pol.metrics:  # each metric's own refusals (e.g. an oracle of another shape)
        pol.metric(name).check(clf, evalset, clf.device)
    twin, twin_record = None, None
    if gradient_twin is not None:
        try:
            twin = load_model(gradient_twin, input_shape=evalset.input_shape, device=device)
        except ModelError as exc:
            raise ModelError(f"gradient twin: {exc}") from None
        if not clf.differentiable:
            clf, twin_record = with_gradient_twin(clf, twin, evalset.x, tolerance=twin_tolerance,
                                                  batch_size=pol.batch_size)
        else:
            log.info("the model has its own input gradients; the gradient twin serves only as "
                     "a parity reference")
    refuse_white_box(pol, clf)
    with model_failures("the first forward passes", model_parts(clf, twin), pol.batch_size), \
            model_threads(clf, n_threads):
        deterministic = engine.check_deterministic(clf, evalset, pol.batch_size)
        clf = engine.check_outputs(clf, evalset, pol.batch_size, pol.model.outputs)
    model_findings = {}
    if pol.model.stochastic:
        clf = engine.seeded_forwards(clf, seed)
        log.info("the policy declares the model stochastic: every forward pass is seeded from "
                 "the run's seed; guarantees are about the random classifier")
    elif deterministic["state"] == verdict.FAILED:
        model_findings["deterministic_forward"] = {
            "detail": f"{deterministic['detail']}, and the policy does not declare it "
                      "stochastic ('model: {stochastic: true}'), so its results are not "
                      "reproducible",
            "undermines": "all", "compensated_by": None}
        log.warning("%s: every requirement is INCONCLUSIVE unless the policy declares "
                    "'model: {stochastic: true}'", deterministic["detail"])
    # the per-feature threat model: every metric runs on encoded inputs (robust_cert.tabular)
    run_clf, run_set, run_twin = clf, evalset, twin
    if threat is not None:
        run_clf, run_set = threat.wrap(clf), threat.encode(evalset)
        run_twin = threat.wrap(twin) if twin is not None else None
        evalset = dataclasses.replace(evalset, input_range=(float(threat.lo.min()),
                                                            float(threat.hi.max())))
    expected = None
    if pol.time_budget_s is not None or announce is not None:
        # estimate first (rank 0), and refuse an over-budget run before the real one
        from robust_cert.plan import check_budget, plan

        refused = None
        if world.main:
            with model_threads(clf, n_threads):
                estimate = plan(run_clf, run_set, pol, seed=seed, gradient_twin=run_twin,
                                processes=world.size)
            log.info("estimated cost:\n%s", estimate.table())
            if announce is not None:
                announce(estimate)
            expected = {m.metric: m.seconds for m in estimate.metrics}
            try:
                check_budget(estimate, pol.time_budget_s)
            except PolicyError as exc:
                refused = exc
        world.exchange(None, refused)
    with model_threads(clf, n_threads):
        results = engine.run_suite(run_clf, run_set, pol, seed=seed, progress=progress,
                                   gradient_twin=run_twin, world=world, expected_s=expected)
    if not world.main:
        return None
    assert results is not None  # run_suite returns the results on the main process
    overall, outcomes = verdict.decide(pol, results)
    overall, outcomes, checks = verdict.apply_sanity(pol, results, outcomes,
                                                     model_findings=model_findings)
    sanity = {
        "deterministic_forward": deterministic["state"],
        "deterministic_detail": deterministic["detail"],
        "stochastic_declared": pol.model.stochastic,
        "guarantee_for": ("the random classifier: every forward pass draws fresh randomness, "
                          "seeded from the run's seed so the run reproduces")
        if pol.model.stochastic else "the model as a deterministic function",
        "outputs": pol.model.outputs,
        "checks": checks,
        "waived": [w.model_dump() for w in pol.waive],
    }
    return _build_certificate(clf, evalset, pol, results, overall, outcomes, seed=seed,
                              threads=n_threads, sanity=sanity, command=command,
                              twin=twin_record, processes=world.size, threat=threat)


def model_threads(clf: Classifier, threads: int):
    """While open, a black-box model (a format of
    :data:`robust_cert.models.blackbox.FORMATS`) computes on the certification's ``threads``:
    the native thread pools of the process (OpenMP, BLAS) are limited to it
    (:func:`robust_cert.devices.library_threads`), as torch's intra-op threads are. Any
    other model: nothing changes (torch's threads are set by
    :func:`robust_cert.devices.configure_threads`; ONNX Runtime has its own settings)."""
    from robust_cert.models.blackbox import FORMATS

    if clf.format not in FORMATS:
        return contextlib.nullcontext()
    return devices.library_threads(threads)


def feature_threat(pol: Policy, evalset: EvalSet):
    """The policy's per-feature threat model fitted on ``evalset``
    (:class:`robust_cert.tabular.FeatureThreat`), or None without ``features:``. Refuses,
    before anything runs, a metric that cannot honour it, a feature the data lacks, a range
    the data leaves, and radii wider than the widest feature (PolicyError / DataError)."""
    if pol.features is None:
        return None
    from robust_cert import tabular

    tabular.refuse_unsupported(pol)
    threat = tabular.fit(pol.features, evalset)
    threat.check_radii(pol)
    return threat


def refuse_white_box(pol: Policy, clf: Classifier) -> None:
    """Refuse, before anything runs, a policy that asks a black-box model (a format of
    :data:`robust_cert.models.blackbox.FORMATS`: scikit-learn, XGBoost, LightGBM, pyfunc;
    no gradient twin) for a metric or attack that needs input gradients: PolicyError naming
    the metric (and the attacks or estimators), the format and the alternatives — the
    black-box attack ``square``, a gradient twin, or an ONNX export with a twin.

    Which configurations need gradients is the metrics' own ``needs_gradients`` (from the
    catalog, refined per configuration: robust accuracy with Square alone and analytical
    robustness with the softmax estimator alone need none). ONNX models keep their
    behaviour: a gradient metric is reported "not applicable" there, since the twin route is
    what ONNX is certified with."""
    from robust_cert.models.blackbox import FORMATS

    if clf.differentiable or clf.format not in FORMATS:
        return
    model = f"{clf.name} v{clf.version}" if clf.version else clf.name
    routes = ("certify with a gradient twin (--gradient-twin / gradient_twin=: a "
              "differentiable model with the same predictions), or an ONNX export of the "
              "model with such a twin")
    for name in pol.metrics:
        metric = pol.metric(name)
        if not metric.needs_gradients:
            continue
        config = metric.config
        if name == "robust_accuracy":
            white = [a for a in config.attacks if a != "square"]
            what = f"attack{'s' if len(white) > 1 else ''} {', '.join(white)}"
            fix = "use attacks: [square] (the black-box attack), or " + routes
        elif name == "analytical_robustness":
            grads = [e for e in config.estimators if e != "softmax"]
            what = f"estimator{'s' if len(grads) > 1 else ''} {', '.join(grads)}"
            fix = "use estimators: [softmax], primary: softmax (outputs only), or " + routes
        else:
            what, fix = "this metric", routes
        raise PolicyError(f"metrics.{name}: {what} needs input gradients, which the "
                          f"{clf.format} model {model} does not give (a black-box model: "
                          f"outputs only); {fix}")


def check_radii(pol: Policy, evalset: EvalSet) -> None:
    """Refuse a perturbation radius larger than the input range itself: an L∞ ball wider than
    the range (or an L2 ball wider than its diagonal) covers every valid input, so the
    number measured would not be about robustness. Raises PolicyError naming the metric."""
    lo, hi = evalset.input_range
    width = float(hi) - float(lo)
    dims = 1
    for d in evalset.input_shape:
        dims *= int(d)
    for name in pol.metrics:
        config = pol.metric(name).config
        eps = getattr(config, "eps", None)
        if eps is None:
            continue
        norm = str(getattr(config, "norm", None) or getattr(config, "distribution", "linf"))
        l2 = "l2" in norm
        limit = width * dims ** 0.5 if l2 else width
        for e in (eps if isinstance(eps, (list, tuple)) else [eps]):
            if e > limit:
                raise PolicyError(
                    f"metrics.{name}.eps: ε = {e:g} is larger than the input range "
                    f"[{lo:g}, {hi:g}] allows ({'L2 diagonal' if l2 else 'L∞ width'} "
                    f"{limit:.4g}): such a ball covers every input; use radii in data units")


def _build_certificate(clf: Classifier, evalset: EvalSet, pol: Policy,
                       results: dict[str, MetricResult], overall: Verdict, outcomes, *, seed: int,
                       threads: int, sanity: dict, command: str | None,
                       twin: dict | None = None, processes: int = 1,
                       threat=None) -> Certificate:
    body = {
        "schema": SCHEMA,
        "issued_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "verdict": Verdict(overall).value,
        "model": {
            "name": clf.name,
            "version": clf.version,
            "uri": clf.uri,
            "format": clf.format,
            "sha256": clf.sha256,
            "num_classes": clf.num_classes,
            "input_shape": list(clf.input_shape),
            "gradients": clf.differentiable,
            "gradient_twin": twin,
            **clf.extra,
        },
        "data": {**evalset.describe(clf.num_classes),
                 **({"features": threat.record()} if threat is not None else {})},
        "policy": {
            "name": pol.name,
            "version": pol.version,
            "sha256": pol.sha256,
            "confidence": pol.confidence,
            "document": pol.canonical(),
        },
        "environment": {
            **library_versions(),
            "device": str(clf.device),
            "device_name": (torch.cuda.get_device_name(clf.device)
                            if clf.device.type == "cuda" else platform.processor() or "cpu"),
            "threads": threads,
            "processes": processes,
            "platform": platform.platform(),
        },
        "seed": seed,
        "command": command,
        "sanity": sanity,
        "decision_rule": DECISION_RULE,
        "results": [result_to_dict(r, pol.confidence) for r in results.values()],
        "requirements": [o.to_dict() for o in outcomes],
    }
    per_point = {f"{name}/{key}": arr for name, res in results.items()
                 for key, arr in res.per_point.items()}
    if threat is not None:  # adversarial inputs in data units, as the model saw them
        per_point = threat.decode_per_point(per_point)
    cert = Certificate(body=body, per_point=per_point)
    cert.validate()  # a body that does not match the schema is a bug here, not a certificate
    return cert
