"""The report's first screen: the two questions, each answered by its verdicts, one figure and plain words.

Verdicts are assigned to a question by the prefix of their stable ``id`` (a contract of ``verdicts.json``):

* question 1, the inertia interpretation of latent weights (Helwegen et al. 2019, Sec. 3): ``inertia.``,
  ``theorem1.``, ``tau0.``;
* question 2, per-layer Bop thresholds — does one global τ serve wide and thin layers?: ``thresholds.``.

Everything else (e.g. ``schedules.flip_ratio``, or a verdict without an id) is listed under "Other verdicts", so no
verdict is dropped. The plain-words sentence of a verdict comes from :data:`PLAIN` (id → one sentence per outcome);
a verdict whose id is not in the map is said with its own claim. Pure functions: they only select and phrase.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .stats import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, Verdict


@dataclass(frozen=True)
class Question:
    key: str
    title: str
    prefixes: tuple[str, ...]
    figures: tuple[tuple[str, str], ...]  # (id prefix, figure file name), in order of preference


QUESTIONS = (
    Question("inertia", "Q1. Is a latent weight's magnitude inertia (Helwegen et al. 2019)?",
             ("inertia.", "theorem1.", "tau0."),
             (("inertia.magnitude_reset", "magnitude_reset.png"), ("inertia.latent_network", "latent_network.png"),
              ("inertia.hazard", "hazard.png"), ("theorem1.", "theorem1_scaled.png"), ("tau0.", "tau0.png"),
              ("inertia.bop_vs_latent", "bop_vs_latent.png"),
              ("inertia.flip_probability", "inertia_flip_probability.png"))),
    Question("thresholds", "Q2. Does one global Bop threshold serve wide and thin layers?", ("thresholds.",),
             (("thresholds.fan_in_controlled", "width_sweep.png"), ("thresholds.fan_in_pooled", "fan_in_law.png"),
              ("thresholds.one_tau_wide_flip_less", "fan_in_law.png"), ("thresholds.policies", "policies.png"),
              ("thresholds.one_layer_sweep", "tau_sweep.png"), ("thresholds.recommendation", "thresholds.png"))),
)

# id -> {outcome: sentence}; the id matches a verdict whose id equals it or starts with it followed by "." or "_"
PLAIN: dict[str, dict[str, str]] = {
    "inertia.magnitude_reset": {
        SUPPORTED: "Resetting the latent magnitudes (signs kept) cost only a transient: the magnitudes acted as "
                   "inertia, as Helwegen et al. argue.",
        NOT_SUPPORTED: "Resetting the latent magnitudes (signs kept) did lasting damage: the magnitudes carried more "
                       "than inertia.",
    },
    "inertia.latent_network": {
        SUPPORTED: "The real-valued latent network was no better than the binary one: nothing suggests the binary "
                   "network merely approximates it.",
        NOT_SUPPORTED: "The real-valued latent network did better than the binary one: the binary network behaves "
                       "like an approximation of it.",
    },
    "inertia.hazard": {
        SUPPORTED: "Weights more steps away from flipping flipped less often (odds ratio per doubling of the "
                   "distance in steps), as inertia predicts — and as any thresholded real-valued state would, so "
                   "this does not separate inertia from approximation.",
        NOT_SUPPORTED: "Distance to flipping, counted in steps, did not lower the flip hazard.",
    },
    "inertia.flip_probability": {
        SUPPORTED: "Weights with larger inertia flipped less often in the next k steps (this holds for any state "
                   "with a threshold, so it cannot tell inertia from approximation).",
        NOT_SUPPORTED: "Weights with larger inertia did not flip less often.",
    },
    "inertia.bop_vs_latent": {
        SUPPORTED: "Started from the same signs, Bop and latent Adam flipped overlapping sets of weights, more "
                   "than chance given how many each flipped (expected under either view).",
        NOT_SUPPORTED: "Started from the same signs, Bop and latent Adam flipped sets of weights that overlap no more "
                       "than chance.",
    },
    "theorem1.scaled": {
        SUPPORTED: "Scaling the learning rate and the initial latent weights by C = 3, 10, 100 changed the binary "
                   "weights no more than rounding alone does (Theorem 1): only magnitude relative to step size "
                   "matters.",
        NOT_SUPPORTED: "Scaling the learning rate and the initial latent weights changed the binary weights beyond "
                       "rounding, against Theorem 1.",
    },
    "theorem1.clipping": {
        SUPPORTED: "With clipping, Theorem 1 breaks, as expected: clipping caps inertia, so the magnitude itself "
                   "matters once scaled weights reach the bound.",
        NOT_SUPPORTED: "With clipping, scaling still changed the binary weights no more than rounding does.",
    },
    "theorem1.pair": {
        SUPPORTED: "The Theorem 1 pair kept identical binary weights.",
        NOT_SUPPORTED: "The Theorem 1 pair's binary weights diverged.",
    },
    "tau0": {
        SUPPORTED: "Bop with τ = 0 and latent SGD gave the same binary weights: at τ = 0 Bop is a latent-weight "
                   "method.",
        NOT_SUPPORTED: "Bop with τ = 0 and its latent-SGD twin diverged.",
    },
    "thresholds.fan_in_controlled": {
        SUPPORTED: "In the controlled width sweep, wider layers had smaller |m|: one global τ makes wide layers "
                   "flip less, so they need a smaller threshold.",
        NOT_SUPPORTED: "In the controlled width sweep, |m| did not fall with width: one global τ suits wide and "
                       "thin layers alike.",
    },
    "thresholds.fan_in_pooled": {
        SUPPORTED: "Pooled over the layers of all models, |m| falls with fan-in: wide layers need a smaller "
                   "threshold.",
        NOT_SUPPORTED: "Pooled over the layers of all models, |m| does not fall with fan-in.",
    },
    "thresholds.one_tau_wide_flip_less": {
        SUPPORTED: "Under one global τ, wide layers flipped less than thin ones.",
        NOT_SUPPORTED: "Under one global τ, wide layers did not flip less than thin ones.",
    },
    "thresholds.policies": {
        SUPPORTED: "A per-layer threshold policy beat the best global τ in accuracy.",
        NOT_SUPPORTED: "No per-layer threshold policy beat the best global τ in accuracy.",
    },
    "thresholds.one_layer_sweep": {
        SUPPORTED: "Changing one layer's τ alone moved accuracy: that layer's threshold matters on its own.",
        NOT_SUPPORTED: "Changing one layer's τ alone did not move accuracy.",
    },
    "thresholds.recommendation": {
        SUPPORTED: "Training again with the thresholds recommended from the logs at least halved the spread of the "
                   "layers' flip ratios.",
        NOT_SUPPORTED: "Training again with the thresholds recommended from the logs did not halve the spread of the "
                       "layers' flip ratios.",
    },
    "schedules.flip_ratio": {
        SUPPORTED: "Flip ratios fell with the learning rate / γ in force, as added inertia predicts "
                   "(observational).",
        NOT_SUPPORTED: "Flip ratios did not fall with the learning rate / γ in force.",
    },
}

# pairs of claims that can disagree, with the sentence that tells a reader which to weigh
DISAGREEMENTS: tuple[tuple[str, str, str], ...] = (
    ("thresholds.fan_in_controlled", "thresholds.fan_in_pooled",
     "The controlled width sweep and the pooled fan-in fit disagree. The sweep varies only one layer's fan-in "
     "(depth and fan-out fixed); the pooled fit mixes layers that also differ in depth, fan-out and position, so "
     "for the effect of fan-in itself the controlled result is the one to trust."),
    ("inertia.magnitude_reset", "inertia.flip_probability",
     "The magnitude-reset experiment and the inertia–flip correlation disagree. \"Larger inertia, fewer flips\" "
     "holds for any state with a threshold; only the intervention can tell the inertia view from the approximation "
     "view, so it is the one to trust."),
    ("inertia.hazard", "inertia.flip_probability",
     "The hazard analysis and the decile correlation disagree. The hazard ratio uses each weight's full history "
     "and accounts for censoring; the correlation is bounded by the base rate of flips, so trust the hazard."),
)


def _matches(vid: str, key: str) -> bool:
    return vid == key or vid.startswith(key + ".") or vid.startswith(key + "_")


def plain(v: Verdict) -> str:
    """One plain-words sentence for a verdict: from :data:`PLAIN` by id, else the claim and its outcome."""
    for key, says in PLAIN.items():
        if v.id and _matches(v.id, key):
            if v.verdict in says:
                return says[v.verdict]
            break
    if v.verdict == INCONCLUSIVE:
        return f"Undecided: {v.claim.rstrip('.')} ({v.reason.rstrip('.') or 'too little data'})."
    word = "holds" if v.verdict == SUPPORTED else "does not hold" if v.verdict == NOT_SUPPORTED else v.verdict
    return f"{v.claim.rstrip('.')}: {word}."


@dataclass
class Answer:
    title: str
    verdicts: list[Verdict]
    sentences: list[str]
    figure: Path | None = None
    figure_caption: str = ""
    notes: list[str] = field(default_factory=list)  # disagreements between the verdicts


def question_of(v: Verdict) -> str:
    """The key of the question a verdict answers ("inertia", "thresholds"), or "" for other verdicts."""
    for q in QUESTIONS:
        if v.id and any(v.id.startswith(p) for p in q.prefixes):
            return q.key
    return ""


def disagreements(verdicts: list[Verdict]) -> list[str]:
    """Sentences for known claim pairs whose decided verdicts differ, and for one claim with opposite outcomes."""
    decided = [v for v in verdicts if v.verdict != INCONCLUSIVE and v.id]
    out = []
    for a, b, sentence in DISAGREEMENTS:
        va = {v.verdict for v in decided if _matches(v.id, a)}
        vb = {v.verdict for v in decided if _matches(v.id, b)}
        if va and vb and va != vb:
            out.append(sentence)
    by_id: dict[str, set[str]] = {}
    for v in decided:
        by_id.setdefault(v.id, set()).add(v.verdict)
    for vid, outs in by_id.items():
        if len(outs) > 1:
            out.append(f"The verdicts of {vid} differ between groups (families, datasets or pairs): each holds "
                       "for its own group, named in its claim; none is an overall answer.")
    return out


def _dedupe(sentences: list[str]) -> list[str]:
    return list(dict.fromkeys(sentences))


def build_answers(verdicts: list[Verdict], figure: Callable[[str], Path | None]) -> list[Answer]:
    """The two questions (and "Other verdicts" when some verdicts belong to neither), each with its verdicts,
    plain-words sentences, disagreement notes and the first drawn figure of the question's preference list whose
    id prefix matches one of its decided verdicts (else one of its verdicts). ``figure(name)`` gives the path of a
    figure file name, or None when the report did not draw it."""
    out = []
    for q in QUESTIONS:
        vs = sorted((v for v in verdicts if question_of(v) == q.key), key=lambda v, q=q: _rank(v, q))
        fig, cap = None, ""
        decided = [v for v in vs if v.verdict != INCONCLUSIVE]
        for pool in (decided, vs):  # a figure behind a decided verdict first
            for prefix, name in q.figures:
                p = figure(name)
                if fig is None and p is not None and any(v.id.startswith(prefix) for v in pool):
                    fig, cap = p, f"figures/{name} — the figure behind {prefix.rstrip('.')}"
        out.append(Answer(q.title, vs, _sentences(vs), fig, cap, disagreements(vs)))
    other = [v for v in verdicts if not question_of(v)]
    if other:
        out.append(Answer("Other verdicts", other, _sentences(other), None, "", disagreements(other)))
    return out


def _rank(v: Verdict, q: Question) -> int:
    """A verdict's place in its answer: the order of the question's figure list (the claims that answer it most
    directly first, e.g. the controlled width sweep before the pooled fan-in fit), other ids after."""
    return next((i for i, (prefix, _) in enumerate(q.figures) if v.id.startswith(prefix)), len(q.figures))


def _sentences(vs: list[Verdict]) -> list[str]:
    """Plain words for the decided verdicts, and one line counting the undecided ones (listed with their reasons
    under the answer)."""
    if not vs:
        return ["No run in this report tests this question."]
    decided = [v for v in vs if v.verdict != INCONCLUSIVE]
    out = _dedupe([plain(v) for v in decided])
    n = len(vs) - len(decided)
    if n and not decided:
        out.append(f"Nothing could be decided on these runs: all {n} verdict(s) are inconclusive (each says why, "
                   "e.g. too few seeds).")
    elif n:
        out.append(f"{n} further claim(s) could not be decided on these runs (each inconclusive verdict says why, "
                   "e.g. too few seeds).")
    return out


HOW_TO_READ = (
    "Each verdict tests one claim on the logs and says supported, not supported or inconclusive. Supported: the "
    "95 % interval of its statistic lies on the claim's side. Not supported: the interval excludes every effect "
    "the claim needs (beyond the negligible margin the verdict's method states; equivalence claims use two one-sided "
    "tests, TOST, with a stated margin). Inconclusive: anything else, or too little data (the verdict says why).",
    "Every verdict line names its statistic (a slope, a correlation, a difference, a share of agreeing steps), its "
    "estimate and its two-sided 95 % interval.",
    "The unit of replication is the run (one seed): comparisons between arms count runs, arms that share seeds are "
    "compared as paired differences, and picking the best of several arms is Holm-corrected. Fewer than 3 seeds "
    "decide nothing. Where a verdict counts other units (tracked weights, step windows, layers) its method says so.",
    "n is the number of independent units behind a verdict; the degrees of freedom of a t interval are fewer: "
    "k seeds give k − 1, a log–log fit over n points with one intercept per run gives n − runs − 1. A small df "
    "widens the interval even when n looks large.",
    "Figures draw prepared tables (tables/*.csv) and compute nothing; a figure that summarises says so in its "
    "caption. Per-run detail and each run's full meta.json are at the end, collapsed.",
)
