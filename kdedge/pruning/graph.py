"""The channel groups of a model and their importance, through Torch-Pruning's dependency graph.

Torch-Pruning (DepGraph, Fang et al., CVPR 2023) traces the model once and groups every set of
channels that must be removed together: a convolution's outputs with its BatchNorm and the next
layer's inputs, the outputs of every layer that feeds one residual add, a depthwise convolution's
groups, a concatenation's slices. kdedge does no dependency tracking of its own: it ranks the
channels of each group (:data:`CRITERIA`), decides how many each group keeps
(:func:`kdedge.pruning.run._plan`), and lets Torch-Pruning remove them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdedge._modes import evaluating
from kdedge.errors import BackendUnavailable, ModelError
from kdedge.models.pruned import NARROWABLE

__all__ = ["CRITERIA", "ChannelGraph", "GroupInfo", "torch_pruning"]

#: Importance criteria: L2 norm of every weight in the group (Li et al. 2017, grouped as DepGraph
#: does), the BatchNorm scale |γ| (network slimming, Liu et al. 2017), and first-order Taylor
#: |w·∂L/∂w| on training batches (Molchanov et al. 2019).
CRITERIA = ("magnitude", "bn_scale", "taylor")


def torch_pruning() -> Any:
    """The ``torch_pruning`` module, or one line saying how to install it."""
    try:
        import torch_pruning as tp
    except ImportError:
        raise BackendUnavailable("structured pruning needs Torch-Pruning: pip install 'kdedge-distill[prune]' (torch-pruning>=1.6)") from None
    return tp


@dataclass(frozen=True)
class GroupInfo:
    """One group of coupled channels: its root layer, its width, and every layer it narrows."""

    root: str
    channels: int
    layers: tuple[str, ...]


class ChannelGraph:
    """The prunable channel groups of ``model`` (traced on one zero input of ``input_shape``).

    The classifier (the last convolution or linear layer that runs) keeps its outputs: they are the
    classes. ``ignore`` names layers whose outputs keep every channel: a group that would remove
    one of their output channels is left alone (their inputs may still narrow with the layer before).

    Raises:
        ModelError: Torch-Pruning cannot trace the model, a name in ``ignore`` is not a layer, a
            group would narrow a layer whose width kdedge cannot record (named, with the
            ``--ignore-layers`` that keeps it whole), or nothing is left to prune.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], *, ignore: Iterable[str] = ()) -> None:
        tp = torch_pruning()
        self.model = model
        self.names = {m: n for n, m in model.named_modules()}
        modules = dict(model.named_modules())
        ignore = tuple(ignore)
        unknown = [n for n in ignore if n not in modules or n == ""]
        if unknown:
            layers = [n for n, m in modules.items() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
            raise ModelError(f"--ignore-layers names no layer of the model: {', '.join(unknown)}; its convolution and linear layers are "
                             f"{', '.join(layers[:12])}{', ...' if len(layers) > 12 else ''}")
        self.example = torch.zeros(1, *input_shape, device=next(model.parameters()).device)
        head = _classifier(model, self.example)
        ignored = [modules[n] for n in ignore] + ([head] if head is not None else [])
        frozen = [p for p in model.parameters() if not p.requires_grad]
        try:
            for p in frozen:  # Torch-Pruning traces the autograd graph: a frozen model (a teacher) has none
                p.requires_grad_(True)
            with evaluating(model), torch.enable_grad():
                self.dg = tp.DependencyGraph().build_dependency(model, example_inputs=self.example)
        except Exception as exc:  # Torch-Pruning raises many types on graphs it cannot trace
            raise ModelError(f"Torch-Pruning cannot trace the model ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                             "prune a model whose forward is plain tensor code, or keep the failing layers whole with --ignore-layers") from exc
        finally:
            for p in frozen:
                p.requires_grad_(False)
        self.head = self.names.get(head) if head is not None else None
        self.roots: dict[str, tuple[nn.Module, Callable]] = {}
        self.groups: dict[str, GroupInfo] = {}
        for group in self.dg.get_all_groups(ignored_layers=ignored, root_module_types=[nn.modules.conv._ConvNd, nn.Linear]):
            root = group[0].dep.target.module
            members = [dep.target.module for dep, _ in group]
            bad = next((m for m in members if isinstance(m, nn.Module) and _has_params(m) and not isinstance(m, NARROWABLE)), None)
            name = self.names[root]
            if bad is not None:
                raise ModelError(f"layer {self.names.get(bad, '?')!r} ({type(bad).__name__}) would be narrowed with {name!r}, but kdedge can "
                                 f"rebuild only the widths of {', '.join(sorted({t.__name__ for t in NARROWABLE}))}; keep the group whole with "
                                 f"--ignore-layers {name}")
            self.roots[name] = (root, group[0].dep.handler)
            layers = tuple(sorted({self.names[m] for m in members if isinstance(m, nn.Module) and m in self.names and _has_params(m)}))
            self.groups[name] = GroupInfo(name, len(group[0].idxs), layers)
        if not self.groups:
            what = ("every convolution and linear layer is the classifier or in --ignore-layers" if ignore else
                    "it has no convolution or linear layer but the classifier (whose outputs are the classes)")
            raise ModelError(f"the model has nothing to prune: {what}; prune a model with hidden convolution or linear layers")

    def importance(self, criterion: str, *, grads_from: Callable[[], None] | None = None) -> dict[str, torch.Tensor]:
        """Per group, one score per channel, normalized to mean 1 within the group (so groups compare).

        ``taylor`` needs gradients: ``grads_from`` runs forward and backward on training batches.
        ``bn_scale`` falls back to magnitude for a group without a BatchNorm.
        """
        tp = torch_pruning()
        if criterion not in CRITERIA:
            raise ModelError(f"unknown pruning criterion {criterion!r}; expected one of {', '.join(CRITERIA)} or auto")
        magnitude = tp.importance.GroupMagnitudeImportance(p=2, normalizer="mean")
        scorer = {"magnitude": magnitude, "bn_scale": tp.importance.BNScaleImportance(normalizer="mean"),
                  "taylor": tp.importance.GroupTaylorImportance(normalizer="mean")}[criterion]
        if criterion == "taylor":
            if grads_from is None:
                raise ModelError("the taylor criterion needs gradients: pass training batches")
            self.model.zero_grad(set_to_none=True)
            grads_from()
        scores = {}
        for name, (root, handler) in self.roots.items():
            group = self.dg.get_pruning_group(root, handler, idxs=list(range(self.groups[name].channels)))
            try:
                s = scorer(group)
            except AttributeError:  # Taylor: a layer of the group got no gradient on these batches (a branch the forward skips)
                s = None
            if s is None:  # bn_scale without a BatchNorm, or taylor without gradients: the group is ranked by magnitude
                s = magnitude(group)
            scores[name] = torch.nan_to_num(s.detach().float().cpu(), nan=0.0)
        if criterion == "taylor":
            self.model.zero_grad(set_to_none=True)
        return scores

    def remove(self, removed: dict[str, list[int]]) -> None:
        """Remove channels ``removed[root]`` (indices into that group's current channels) from each group, in place."""
        for name, idxs in removed.items():
            if not idxs:
                continue
            root, handler = self.roots[name]
            group = self.dg.get_pruning_group(root, handler, idxs=sorted(idxs))
            if not self.dg.check_pruning_group(group):
                raise ModelError(f"Torch-Pruning refuses to remove {len(idxs)} of the {self.groups[name].channels} channels of {name!r} (it would leave none)")
            group.prune()
        self.groups = {n: GroupInfo(g.root, g.channels - len(removed.get(n, ())), g.layers) for n, g in self.groups.items()}


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _classifier(model: nn.Module, x: torch.Tensor) -> nn.Module | None:
    """The last convolution or linear layer that runs in a forward pass: its outputs are the logits."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda m, _i, _o: order.append(m)) for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        with evaluating(model), torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return order[-1] if order else None
