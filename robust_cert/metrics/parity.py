"""Deployment parity: does the certified model predict what a reference model predicts?

The typical use is an exported ONNX graph (what ships) against the PyTorch model it came from
(what was trained and attacked): gradient metrics cannot run on the graph, so the certificate
carries over their results only as far as the two models agree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from pydantic import Field

from robust_cert.data import EvalSet
from robust_cert.errors import ModelError
from robust_cert.loaders import load_model
from robust_cert.metrics.base import (
    Metric,
    MetricConfig,
    MetricResult,
    Proportion,
    RunContext,
    batches,
    value_list,
)
from robust_cert.models.base import Classifier

#: The ``reference`` value naming the gradient twin given to certify.
TWIN = "twin"


if TYPE_CHECKING:  # the type value_list() builds (a call is no type expression)
    Radii = list[float]
else:
    Radii = value_list("ε", low=0, low_open=True, hint=" (clean agreement is always measured)")


class ParityConfig(MetricConfig):
    """Parameters of :class:`Parity`."""

    reference: str = Field(
        min_length=1,
        description="the reference model: an .onnx path, a models:/ URI (relative paths are "
        "read from the working directory), or 'twin': the gradient twin given to certify",
    )
    eps: Radii = Field(
        default=[],
        description="L∞ radii at which agreement is also measured on uniformly perturbed inputs",
    )


class Parity(Metric[ParityConfig]):
    """Argmax agreement between the model and a reference model, on clean and perturbed data.

    Proportions: ``{}`` is the clean agreement — k points of n where both models predict the
    same class; for each ``eps`` in the config, ``{"eps": ε}`` is the agreement on x + δ with
    one δ ~ U(B∞(ε)) per point (clipped to the input range; both models see the same input).
    The noise is drawn from the run's seeded generator, so a seed fixes the result.

    Kind: statistical. The points are i.i.d. draws, so the exact Clopper–Pearson interval
    covers the probability that the two models agree on a fresh point (or noisy point).
    Agreement is about predictions, not labels: a wrong prediction both models share counts
    as agreement.

    Args (policy ``metrics.parity``):
        reference: an ``.onnx`` path or ``models:/NAME/VERSION`` (``@ALIAS``) URI, loaded
            through :func:`robust_cert.loaders.load_model` when the metric runs; or ``twin``: the
            gradient twin given to :func:`robust_cert.certify` (``ctx.gradient_twin``), so the
            policy states how closely the deployed graph must follow the model whose
            gradients crafted its attacks. ``twin`` without a twin is an error before any
            metric runs.
        eps: radius or list of radii (default none: clean agreement only).

    A policy requirement then reads ``{metric: parity, at_least: 0.999}`` (clean) or
    ``{metric: parity, eps: 0.05, at_least: 0.99}``.

    Diagnostics: the reference's identity (format, sha256, uri) and the largest absolute
    logit difference on clean and on each perturbed set; per-point arrays hold the agreement
    and each point's largest |Δ logit|.

    Sharding (:attr:`shardable`): every outcome is per point; the noise δ is drawn per block
    (from the seed and the block's first point), counts add, and the largest |Δ logit| merges
    as the largest of the blocks' (:attr:`merge_rules`). A file or registry reference is
    loaded once per metric instance, not once per block.
    """

    name = "parity"
    description = "P[argmax f(x') = argmax g(x')] for the reference g, x' = x or clip(x+δ)"
    Config = ParityConfig

    #: the reference is the same model in every block; the largest |Δ logit| of the whole
    #: set is the largest of the blocks'
    merge_rules = {"reference": "same", "max_abs_logit_diff": "max"}

    def __init__(self, config: ParityConfig):
        super().__init__(config)
        #: loaded references by (reference, input shape, device): a sharded run loads a file
        #: or registry reference once, not once per block (the same model every time)
        self._references: dict[tuple, Classifier] = {}

    @property
    def uses_twin(self) -> bool:
        return self.config.reference == TWIN

    def selectors(self):
        return [{}] + [{"eps": e} for e in self.config.eps]

    def cost(self, n_points: int) -> int:
        return n_points * (1 + len(self.config.eps))

    def _reference(self, data: EvalSet, ctx: RunContext) -> Classifier:
        cfg = self.config
        if cfg.reference == TWIN:
            ref = ctx.gradient_twin
            if ref is None:
                raise ModelError("parity reference 'twin': no gradient twin was given")
            return ref
        key = (cfg.reference, tuple(data.input_shape), str(ctx.device))
        if key not in self._references:
            try:
                self._references[key] = load_model(cfg.reference, input_shape=data.input_shape,
                                                   device=ctx.device)
            except ModelError as exc:
                raise ModelError(f"parity reference: {exc}") from None
        return self._references[key]

    def run(self, model: Classifier, data: EvalSet, ctx: RunContext) -> MetricResult:
        cfg = self.config
        ref = self._reference(data, ctx)
        if ref.num_classes != model.num_classes or ref.input_shape != model.input_shape:
            raise ModelError(
                f"parity reference {cfg.reference} has input {ref.input_shape} and "
                f"{ref.num_classes} classes; the model has {model.input_shape} and "
                f"{model.num_classes}")
        lo, hi = data.input_range
        props, per_point = [], {}
        for eps in [0.0, *cfg.eps]:
            # per block: (seed, label, first point); drawn on the CPU, so any device draws alike
            g = ctx.generator(f"{self.name}/{eps!r}") if eps else None
            agree, diff = [], []  # on the model's device, copied once per call
            for sl, x, _ in batches(data, ctx.batch_size, torch.device("cpu")):
                if g is not None:
                    x = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * eps).clamp_(lo, hi)
                a = model.logits(x.to(model.device))
                b = ref.logits(x.to(ref.device)).to(a.device)
                agree.append(a.argmax(1) == b.argmax(1))
                diff.append((a - b).abs().amax(1).float())
                ctx.advance(sl.stop - sl.start)
            agree = torch.cat(agree).cpu().numpy()
            diff = torch.cat(diff).cpu().numpy()
            suffix = f"@{eps:g}" if eps else ""
            props.append(Proportion({"eps": eps} if eps else {}, int(agree.sum()), len(data)))
            per_point[f"agree{suffix}"] = agree
            per_point[f"max_abs_logit_diff{suffix}"] = diff
        return self.result(props, per_point=per_point, diagnostics={
            "reference": {"name": ref.name, "format": ref.format, "sha256": ref.sha256,
                          "uri": ref.uri or cfg.reference},
            "max_abs_logit_diff": self._max_diff(per_point),
        })

    def _max_diff(self, per_point: dict[str, np.ndarray]) -> dict[str, float]:
        out = {"clean": float(per_point["max_abs_logit_diff"].max(initial=0.0))}
        for eps in self.config.eps:
            out[f"eps={eps:g}"] = float(per_point[f"max_abs_logit_diff@{eps:g}"].max(initial=0.0))
        return out
