"""Putting a module of a subclass in place of one that open_clip, torchvision or transformers built.

clipx changes how some of their modules compute (fused self-attention, LoRA adapters, locked and
split BatchNorm) by building an instance of its own subclass with the original's settings (on the
meta device: nothing is allocated or initialised twice), handing it the original's parameters,
buffers and submodules (the same objects, under the same names, in the same order) and putting it
where the original was. State-dict keys, and so checkpoints, pretrained loading, exports and
LoRA/PEFT key names, stay exactly what they were, and optimizers built before still hold the
same parameters; what changes is the module's class, whose constructor has run as usual.
A module's hooks are not carried over: clipx rebuilds only modules it registers none on.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch.nn as nn

META = "meta"  # the device new modules are built on before they take over the original's tensors


def _registered(module: nn.Module) -> tuple[list[str], list[str], list[str]]:
    """The names of ``module``'s own parameters, buffers and submodules, in registration order."""
    return ([name for name, _ in module.named_parameters(recurse=False, remove_duplicate=False)],
            [name for name, _ in module.named_buffers(recurse=False, remove_duplicate=False)],
            [name for name, _ in module.named_children()])


def adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new``, fresh from its constructor, given ``old``'s parameters, buffers and submodules, its
    public plain attributes (settings such as ``eps``, a training flag) and nothing else; returns it.
    Refuses a ``new`` whose constructor registered other names than ``old`` holds, which would
    change the state dict."""
    if _registered(new) != _registered(old):
        raise TypeError(f"{type(new).__name__} registers {_registered(new)}, not the {_registered(old)} "
                        f"of the {type(old).__name__} it replaces")
    for name, value in [*old.named_parameters(recurse=False, remove_duplicate=False),
                        *old.named_buffers(recurse=False, remove_duplicate=False), *old.named_children()]:
        setattr(new, name, value)  # an existing name keeps its place (and a buffer its persistence)
    for name, value in vars(old).items():
        if not name.startswith("_"):  # torch's own bookkeeping (registries, hooks) starts with "_"
            setattr(new, name, value)
    return new


def batchnorm_as(cls: type, bn: nn.Module) -> nn.Module:
    """A ``cls`` (a BatchNorm subclass) holding ``bn``'s statistics, affine parameters and settings."""
    return adopt(cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                     track_running_stats=bn.track_running_stats, device=META), bn)


def replace_modules_(root: nn.Module, convert: Callable[[nn.Module, str], Optional[nn.Module]]) -> nn.Module:
    """Put ``convert(module, path)`` in place of every module of ``root`` for which it returns a module
    (None keeps it), ``root`` itself included (path ""). Parents are converted before their children,
    which ``convert`` sees at their original paths; a module reachable by several paths is converted
    once and replaced at each. Returns the root: a new one if ``root`` itself was converted."""
    edges = [(path, parent, name, child) for path, parent in root.named_modules() for name, child in parent.named_children()]
    replaced: dict[int, nn.Module] = {id(root): _converted(convert, root, "")}
    for parent_path, parent, name, child in edges:
        if id(child) not in replaced:
            replaced[id(child)] = _converted(convert, child, f"{parent_path}.{name}" if parent_path else name)
        if replaced[id(child)] is not child:
            setattr(replaced.get(id(parent), parent), name, replaced[id(child)])
    return replaced[id(root)]


def _converted(convert: Callable[[nn.Module, str], Optional[nn.Module]], module: nn.Module, path: str) -> nn.Module:
    new = convert(module, path)
    return module if new is None else new  # not ``or``: an empty container module is falsy
