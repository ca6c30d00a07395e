"""Interventions on a running optimization: reset the *inertia* of every binary weight and keep its sign.

Helwegen et al. (2019, Sec. 3) read a latent weight w̃ = sign(w̃)·|w̃| as a binary weight sign(w̃) plus an inertia
|w̃| (how much accumulated gradient it takes to flip the sign). The competing "approximation" view holds that w̃ is
the model and sign(w̃) approximates it. :func:`reset_inertia` replaces the inertia and keeps every sign, so the
binary network is exactly the same right after the reset; the inertia view then predicts a transient (a burst of
flips, after which accuracy and loss return to the unperturbed run), the approximation view lasting damage.

What is reset, per binary parameter ("layer"), with ``s = sign(x)`` (sign(0) = +1) and a layer mean ``mean_l``:

* latent weights (any optimizer that is not Bop-family), x = w̃:
  ``constant``: w̃ ← s · mean_l |w̃|;  ``shuffle``: w̃ ← s · π(|w̃|), π a random permutation within the layer.
  A magnitude that would be 0 is raised to the smallest normal float, so that no sign can change (sign(−0) = +1).
  Clipping bounds are respected by both (the mean and the permuted values are magnitudes already in the layer).
  The optimizer's own state (Adam's ``exp_avg``/``exp_avg_sq``, SGD momentum) is left as it is: it is a gradient
  statistic, not the weight, and zeroing Adam's second moment would make the next step m/ε, a confound.
* Bop family (:class:`~bnn_probe.optim.Bop`, Bop2ndOrder), x = m = ``state["exp_avg"]``; the flip rule is
  w·m_t > τ, so the inertia is τ − w·m:
  ``zero``: m ← 0 (every weight starts afresh at inertia τ);  ``constant``: m ← s · mean_l |m|;
  ``shuffle``: m ← s · π(|m|). ``constant`` and ``shuffle`` keep the sign of m and hence, w being unchanged, the
  sign of w·m. Bop2ndOrder's ``exp_avg_sq`` (v, the normaliser) is kept. The binary weights are not touched.

``zero`` is refused for latent weights (it would leave no sign). The returned count is the number of weights whose
stored value changed. When a :class:`~bnn_probe.Probe` is attached to the optimizer, the reset is recorded in the
run (``meta.json`` → ``interventions``; docs/runlog-format.md).

Example:
    >>> import torch
    >>> from bnn_probe.models import BinaryMLP
    >>> model = BinaryMLP(8, [16], 2)
    >>> opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    >>> before = [torch.where(p >= 0, 1, -1) for p in (model[1].weight,)]
    >>> n = reset_inertia(opt, mode="constant")
    >>> bool((torch.where(model[1].weight >= 0, 1, -1) == before[0]).all())
    True
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .errors import BnnProbeError

__all__ = ["LATENT_MODES", "BOP_MODES", "MODES", "reset_inertia", "apply_intervention", "find_probes"]

LATENT_MODES: tuple[str, ...] = ("constant", "shuffle")
BOP_MODES: tuple[str, ...] = ("zero", "constant", "shuffle")
MODES: tuple[str, ...] = ("constant", "shuffle", "zero")
ROLES: tuple[str, ...] = ("control", "reset")


def _sign(x: Tensor) -> Tensor:
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def _new_magnitude(mag: Tensor, mode: str, gen: torch.Generator) -> Tensor:
    flat = mag.reshape(-1)
    if mode == "constant":
        return torch.full_like(flat, float(flat.double().mean())).reshape(mag.shape)
    if mode == "shuffle":
        perm = torch.randperm(flat.numel(), generator=gen).to(flat.device)
        return flat.index_select(0, perm).reshape(mag.shape)
    return torch.zeros_like(mag)  # zero


def _owners(optimizer: torch.optim.Optimizer) -> list[tuple[torch.optim.Optimizer, Tensor]]:
    from .probe.binary_detect import leaf_optimizers

    return [(leaf, p) for leaf in leaf_optimizers(optimizer) for g in leaf.param_groups for p in g["params"]]


def _default_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Binary parameters of the optimizer: every Bop-family parameter and every parameter marked binary."""
    from .nn import is_binary_parameter
    from .probe.binary_detect import family_of

    return [p for leaf, p in _owners(optimizer) if family_of(leaf) != "latent" or is_binary_parameter(p)]


def find_probes(optimizer: torch.optim.Optimizer) -> list[Any]:
    """The probes attached to ``optimizer`` (and still open)."""
    return [p for p in getattr(optimizer, "bnn_probes", ()) if not getattr(p, "_closed", True)]


@torch.no_grad()
def reset_inertia(optimizer: torch.optim.Optimizer, params: Iterable[Tensor] | None = None, mode: str = "constant",
                  seed: int = 0) -> int:
    """Replace the inertia of the binary weights stepped by ``optimizer`` and keep every sign (module docstring).

    Args:
        optimizer: the optimizer stepping the binary weights (a :class:`~bnn_probe.optim.CaseOptimizer` too).
        params: the binary parameters to reset; default: every Bop-family parameter and every parameter marked
            binary (bnn_probe's binary layers, :func:`bnn_probe.nn.mark_binary`). A real-valued parameter may be
            named explicitly: it is then treated as a latent weight.
        mode: ``constant`` (magnitude ← the layer's mean magnitude), ``shuffle`` (magnitudes permuted within the
            layer) or, for Bop-family parameters only, ``zero`` (m ← 0).
        seed: seed of the permutations (``shuffle``).

    Returns the number of weights whose stored value (w̃ or m) changed. Raises :class:`BnnProbeError` for an unknown
    mode, ``zero`` on latent weights, or a parameter the optimizer does not step.
    """
    from .probe.binary_detect import family_of

    if mode not in MODES:
        raise BnnProbeError(f"unknown reset mode {mode!r}: choose one of {', '.join(MODES)}")
    owner = {id(p): leaf for leaf, p in _owners(optimizer)}
    chosen = _default_params(optimizer) if params is None else list(params)
    if not chosen:
        raise BnnProbeError("reset_inertia: the optimizer steps no binary parameter; name them with params=[...]")
    gen = torch.Generator().manual_seed(int(seed))
    changed = 0
    for probe in find_probes(optimizer):  # it measures the next step against the values before the change
        probe.before_edit()
    for p in chosen:
        leaf = owner.get(id(p))
        if leaf is None:
            raise BnnProbeError(f"reset_inertia: a parameter of shape {tuple(p.shape)} is not stepped by the "
                                f"given {type(optimizer).__name__}")
        if family_of(leaf) == "latent":
            if mode == "zero":
                raise BnnProbeError("reset mode 'zero' applies to Bop-family momenta only; latent weights take "
                                    "constant or shuffle")
            x = p.data
            mag = _new_magnitude(x.abs(), mode, gen).clamp_min(torch.finfo(x.dtype).tiny)
        else:
            x = leaf.state.get(p, {}).get("exp_avg")
            if x is None:  # no step yet: m is 0 already
                continue
            mag = _new_magnitude(x.abs(), mode, gen)
        new = _sign(x) * mag
        changed += int((new != x).sum())
        x.copy_(new)
    for probe in find_probes(optimizer):
        probe.mark_intervention("reset_inertia", mode=mode, seed=int(seed), n_changed=changed)
    return changed


def apply_intervention(state: Any) -> None:
    """The runner's hook (:func:`bnn_probe.train.run_epoch`): at ``config.intervention["step"]`` reset the inertia
    (role ``reset``) or record the branch point only (role ``control``)."""
    iv = state.config.intervention
    if not iv or state.step != int(iv["step"]):
        return
    if iv["role"] == "reset":
        reset_inertia(state.optimizer, mode=iv["mode"], seed=state.config.seed)
    else:
        for probe in find_probes(state.optimizer):
            probe.mark_intervention("control", mode=iv["mode"], seed=state.config.seed, n_changed=0)


def check_intervention(iv: Any) -> dict[str, Any] | None:
    """Validate a run config's ``intervention`` entry ``{"pair", "role", "step", "mode"}`` (raises BnnProbeError)."""
    if iv is None:
        return None
    if not isinstance(iv, dict) or set(iv) != {"pair", "role", "step", "mode"}:
        raise BnnProbeError("intervention must be a dict with exactly the keys pair, role, step, mode; got "
                            f"{iv!r}")
    if not isinstance(iv["pair"], str) or not iv["pair"]:
        raise BnnProbeError(f"intervention pair must be a non-empty name, got {iv['pair']!r}")
    if iv["role"] not in ROLES:
        raise BnnProbeError(f"intervention role must be control or reset, got {iv['role']!r}")
    if isinstance(iv["step"], bool) or not isinstance(iv["step"], int) or iv["step"] < 1:
        raise BnnProbeError(f"--reset-inertia-step must be a positive optimizer step, got {iv['step']!r}")
    if iv["mode"] not in MODES:
        raise BnnProbeError(f"--reset-inertia-mode must be one of {', '.join(MODES)}, got {iv['mode']!r}")
    return dict(iv)
