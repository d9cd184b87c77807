"""Build a model from a short string: ``timm:NAME``, ``torchvision:NAME`` or ``file.py:factory``.

The command line names architectures this way, and the same strings work from
Python::

    build_model("timm:resnet18", num_classes=10)     # timm.create_model(..., pretrained=False)
    build_model("torchvision:resnet18")              # get_model(..., weights=None)
    build_model("models/mlp.py:make_mlp")            # import the file, call make_mlp()
    build_model("mypackage.models:build")            # import the module, call build()

Weights are never downloaded: every model starts randomly initialised and gets
its state from a checkpoint (:func:`autobasin.io.load_into`). A name without a
``timm:`` / ``torchvision:`` prefix and without ``:factory`` is a timm name.
Errors are :class:`ModelSpecError` and name what is wrong, with close matches
for a misspelt model name.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable

from torch import nn

__all__ = ["ModelSpecError", "build_model", "load_callable"]


class ModelSpecError(ValueError):
    """A model string names no buildable model (unknown name, missing file or factory)."""


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    if not close:
        # prefix matches help with truncated names ("resnet" -> resnet18, ...)
        close = [k for k in known if k.startswith(name)][:5]
    return f"; did you mean {', '.join(close)}?" if close else ""


def _timm(name: str, num_classes: int | None, kwargs: dict) -> nn.Module:
    import timm

    arch = name.split(".", 1)[0]  # "resnet18.a1_in1k": the part before the pretrained tag
    if not timm.is_model(arch):
        raise ModelSpecError(f"unknown timm model {name!r}{_suggest(arch, timm.list_models())}")
    if num_classes is not None:
        kwargs = {**kwargs, "num_classes": num_classes}
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise ModelSpecError(f"timm model {name!r} does not accept the arguments "
                             f"{kwargs}: {e}") from e


def _torchvision(name: str, num_classes: int | None, kwargs: dict) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models()
    if name not in known:
        raise ModelSpecError(f"unknown torchvision model {name!r}{_suggest(name, known)}")
    if num_classes is not None:
        kwargs = {**kwargs, "num_classes": num_classes}
    try:
        return torchvision.models.get_model(name, weights=None, **kwargs)
    except (TypeError, ValueError) as e:
        raise ModelSpecError(f"torchvision model {name!r} does not accept the arguments "
                             f"{kwargs}: {e}") from e


def _import_file(path: Path):
    """Import a Python file by path as a uniquely named module (kept in sys.modules)."""
    path = path.resolve()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    mod_name = f"_autobasin_user_{path.stem}_{digest}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ModelSpecError(f"cannot import {path}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    folder = str(path.parent)
    added = folder not in sys.path
    if added:  # so the file can import its sibling modules
        sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's file failed; say which and why
        del sys.modules[mod_name]
        raise ModelSpecError(f"importing {path} failed: {type(e).__name__}: {e}") from e
    finally:
        if added:
            try:
                sys.path.remove(folder)
            except ValueError:
                pass
    return module


def load_callable(target: str, what: str = "factory") -> Callable:
    """The callable named by ``path/to/file.py:NAME`` or ``package.module:NAME``.

    Raises :class:`ModelSpecError` naming the missing file, module or attribute.
    """
    where, sep, attr = target.rpartition(":")
    if not sep or not where or not attr:
        raise ModelSpecError(f"{target!r} is not of the form file.py:{what} or module:{what}")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where).expanduser()
        if not path.is_file():
            raise ModelSpecError(f"no such file: {path} (from {target!r})")
        module = _import_file(path)
        origin = str(path)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ModelSpecError(f"cannot import module {where!r} (from {target!r}): {e}") from e
        origin = f"module {where}"
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n, v in vars(module).items()
                           if callable(v) and not n.startswith("_")
                           and getattr(v, "__module__", None) == module.__name__)
            hint = f"; callables defined there: {', '.join(names[:10])}" if names else ""
            raise ModelSpecError(f"{origin} has no {what} named {attr!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelSpecError(f"{attr!r} in {origin} is not callable (it is a {type(obj).__name__})")
    return obj


def _factory(target: str, num_classes: int | None, kwargs: dict) -> nn.Module:
    fn = load_callable(target)
    if num_classes is not None:
        kwargs = {**kwargs, "num_classes": num_classes}
    if kwargs:
        try:
            inspect.signature(fn).bind(**kwargs)
        except TypeError as e:
            raise ModelSpecError(f"factory {target!r} does not accept {sorted(kwargs)}: {e}") from e
        except ValueError:  # no signature (a builtin): just call it
            pass
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"factory {target!r} returned a {type(model).__name__}, "
                             "not a torch.nn.Module")
    return model


def build_model(spec_str: str, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """A randomly initialised model (in eval mode) from a model string.

    Args:
        spec_str: ``timm:NAME``, ``torchvision:NAME``, ``path/to/file.py:factory``,
            ``package.module:factory``, or a bare timm NAME.
        num_classes: passed to the constructor as ``num_classes`` when given.
        **kwargs: further constructor arguments.

    Raises:
        ModelSpecError: unknown model name (with suggestions), missing file,
            module or factory, or a factory that returns no ``nn.Module``.
    """
    spec_str = spec_str.strip()
    if not spec_str:
        raise ModelSpecError("empty model name")
    kind, sep, rest = spec_str.partition(":")
    if sep and kind == "timm":
        model = _timm(rest, num_classes, kwargs)
    elif sep and kind in ("torchvision", "tv"):
        model = _torchvision(rest, num_classes, kwargs)
    elif ":" in spec_str:
        model = _factory(spec_str, num_classes, kwargs)
    elif spec_str.endswith(".py"):
        raise ModelSpecError(f"{spec_str!r}: name the factory function too, as {spec_str}:FACTORY")
    else:
        model = _timm(spec_str, num_classes, kwargs)
    return model.eval()
