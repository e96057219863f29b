"""Reading a weights file without ever running code from it.

A pickle can name any function for the reader to call, so a file is read with an allow-list
of exactly what TorchXRayVision's published files hold: tensors, plain containers and, for
architectures published as whole pickled models, the model's own module classes (derived
from a freshly built model, not written out by hand). Those classes are replaced by inert
stand-ins while reading (a pickle could otherwise call TorchXRayVision's DenseNet
constructor, which itself unpickles another file with no restriction): only the tensors are
taken from the file. Anything else is refused before it runs.
"""

from __future__ import annotations

import functools
import io
import pickle
import pickletools
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

from ..errors import WeightsCorruptError, WeightsUnsafeError
from .registry import ModelSpec

# The published files are 28-95 MB; the bound keeps a huge file from being read into memory.
MAX_WEIGHTS_BYTES = 1 << 30


class _Refused(Exception):
    """The pickle asks for something a TorchXRayVision weights file never contains."""


def read_checkpoint(spec: ModelSpec, data: bytes, path: Path) -> Any:
    """The file's contents: a state dict, or for a whole pickled model the PickledModule
    tree standing in for it. Raises WeightsUnsafeError for anything outside the allow-list
    (nothing in the file has run then) and WeightsCorruptError for what cannot be read."""
    import torch

    try:
        if not spec.pickled_model:
            checkpoint = _load_weights_only(data, ())
        elif data[:4] == b"PK\x03\x04":  # torch's own test for its zip format
            checkpoint = _load_weights_only(data, tuple(_stand_ins(spec.architecture).items()))
        else:
            # torch's weights_only reader refuses the persistent ids with which torch < 1.6
            # named a pickled model's classes, and the published DenseNet files are that old.
            checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False,
                                    pickle_module=_legacy_pickle(spec.architecture))
    except _Refused as exc:
        raise WeightsUnsafeError(unsafe_message(spec, path, str(exc))) from None
    except pickle.UnpicklingError as exc:
        detail = str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()
        raise WeightsUnsafeError(unsafe_message(spec, path, (detail or ["?"])[0][:200])) from None
    except Exception as exc:
        raise WeightsCorruptError(
            f"{path}: cannot read the weights file ({type(exc).__name__}: {str(exc)[:300]}); "
            f"it is not a PyTorch file or it is damaged. Replace it with `xrvd models fetch "
            f"{spec.name}` or `xrvd models import {spec.name} FILE`"
        ) from exc
    if spec.pickled_model:
        expected = _model_class_name(spec.architecture)
        if not (isinstance(checkpoint, PickledModule) and checkpoint.pickled_as == expected):
            held = getattr(checkpoint, "pickled_as", None) or type(checkpoint).__name__
            raise WeightsCorruptError(
                f"{path}: holds a {held}, but {spec.name} weights are a pickled TorchXRayVision "
                f"model ({expected}); is this the right file?")
    elif not isinstance(checkpoint, dict):
        raise WeightsCorruptError(f"{path}: holds a {type(checkpoint).__name__}, but "
                                  f"{spec.name} weights are a state dict; is this the right file?")
    return checkpoint


def unsafe_message(spec: ModelSpec, path: Path, detail: str) -> str:
    return (f"{path}: refused without running anything in it: this is not a TorchXRayVision "
            f"weights file for {spec.name} (it asks for {detail}, which such files never "
            "contain; a file that does could run code when read). Replace it with the "
            f"published file {spec.weights_url}: `xrvd models fetch {spec.name}`, or "
            f"`xrvd models import {spec.name} FILE`")


# torch.serialization.safe_globals adds to a process-wide set and removes on exit: loads that
# overlapped would see each other's stand-ins, or lose them half-way.
_SAFE_GLOBALS = threading.Lock()


def _load_weights_only(data: bytes, allowed: tuple[tuple[type, str], ...]) -> Any:
    """torch's weights_only reader, with `allowed` (stand-in, name it replaces) for this call
    only; its own allow-list covers tensors, storages and plain containers."""
    import torch

    with _SAFE_GLOBALS, torch.serialization.safe_globals([(c, n) for n, c in allowed]):
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class PickledModule:
    """Stands in for one module class a pickled model names (`pickled_as`): it keeps the
    pickled attributes and nothing runs. A pickle that calls the class (rather than
    restoring an instance, as torch.save writes) is refused: TorchXRayVision's DenseNet
    constructor, called with a cache_dir of the file's choosing, would unpickle another file
    with no restriction at all."""

    pickled_as = ""

    def __init__(self, *args: Any, **kwargs: Any):
        raise _refusal(f"a call of {self.pickled_as}")

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise _refusal(f"{self.pickled_as} with state of type {type(state).__name__}")
        self.state = state


def _refusal(what: str) -> Exception:
    # torch's reader passes on only UnpicklingError as a refusal; ours raises _Refused.
    return pickle.UnpicklingError(what)


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _fresh_network(architecture: str) -> Any:
    """A randomly initialised model of a pickled-model architecture, as TorchXRayVision builds
    it before loading weights."""
    import torchxrayvision as xrv

    if architecture != "densenet121":
        raise ValueError(f"{architecture} weights are not a pickled model")
    return xrv.models.DenseNet(num_classes=len(xrv.datasets.default_pathologies))


@functools.cache
def _model_classes(architecture: str) -> tuple[str, tuple[str, ...]]:
    """(the model's class, every class in it) by name, from a freshly built model: exactly
    the classes a pickle of this architecture names. Only the names are kept."""
    network = _fresh_network(architecture)
    return (_class_name(type(network)),
            tuple(sorted({_class_name(type(m)) for m in network.modules()})))


def _model_class_name(architecture: str) -> str:
    return _model_classes(architecture)[0]


@functools.cache
def _stand_ins(architecture: str) -> dict[str, type]:
    """name -> stand-in, for each of the model's classes."""
    return {name: type(f"Pickled[{name}]", (PickledModule,), {"pickled_as": name})
            for name in _model_classes(architecture)[1]}


def allowed_classes(architecture: str) -> tuple[str, ...]:
    """The module classes a pickled model of `architecture` may name (empty for state dicts)."""
    from .registry import PICKLED_MODEL_ARCHITECTURES

    if architecture not in PICKLED_MODEL_ARCHITECTURES:
        return ()
    return tuple(_stand_ins(architecture))


# --- torch's legacy (pre-1.6) format ----------------------------------------------------------
#
# torch.load reads the container (magic number, storages) and hands the pickles to
# `pickle_module`. This one is a small interpreter over pickletools' decoding: it builds plain
# data, stand-ins and tensors, and the only things it calls are the handlers below. It is not
# a restricted stdlib Unpickler, because that one would still let a pickle set attributes on
# what it is allowed to name (BUILD on a function), and torch's legacy reader acts on those.


@dataclass(frozen=True)
class _Call:
    """A function the pickle may call, by what it may be called with."""

    name: str
    handler: Callable[[tuple], Any]


def _ordered_dict(args: tuple) -> OrderedDict:
    if args == ():
        return OrderedDict()
    if len(args) == 1 and type(args[0]) is list and all(
            type(p) is tuple and len(p) == 2 for p in args[0]):
        return OrderedDict(args[0])
    raise _Refused("collections.OrderedDict with arguments")


def _set(args: tuple) -> set:
    if args == ():
        return set()
    if len(args) == 1 and type(args[0]) is list:
        return set(args[0])
    raise _Refused("builtins.set with arguments")


def _no_hooks(hooks: Any) -> None:
    if hooks is not None and not (type(hooks) in (dict, OrderedDict) and not hooks):
        raise _Refused("tensor hooks")


def _rebuild_tensor(args: tuple) -> Any:
    import torch

    if len(args) not in (6, 7):
        raise _Refused("a tensor rebuilt with unexpected arguments")
    storage, offset, size, stride, requires_grad, hooks = args[:6]
    _no_hooks(hooks)
    if len(args) == 7 and args[6]:
        raise _Refused("tensor metadata")
    if not (isinstance(storage, torch.storage.TypedStorage) and type(offset) is int
            and type(size) is tuple and type(stride) is tuple and len(size) == len(stride) <= 8
            and all(type(n) is int and n >= 0 for n in (offset, *size, *stride))
            and type(requires_grad) is bool):
        raise _Refused("a tensor rebuilt with unexpected arguments")
    # set_ grows a storage that is too small: a few bytes could claim gigabytes.
    extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else 0
    if extent > storage._untyped_storage.nbytes() // storage.dtype.itemsize:
        raise _Refused("a tensor larger than its storage")
    return torch._utils._rebuild_tensor_v2(storage, offset, torch.Size(size), stride,
                                           requires_grad, OrderedDict())


def _parameter(args: tuple) -> Any:
    import torch

    if not (1 <= len(args) <= 2 and isinstance(args[0], torch.Tensor)
            and all(type(a) is bool for a in args[1:])):
        raise _Refused("torch.nn.Parameter with unexpected arguments")
    return torch.nn.Parameter(*args)


def _rebuild_parameter(args: tuple) -> Any:
    if len(args) != 3:
        raise _Refused("a parameter rebuilt with unexpected arguments")
    _no_hooks(args[2])
    return _parameter(args[:2])


def _thnn_backend(args: tuple) -> None:
    if args != ():
        raise _Refused("torch.nn.backends.thnn._get_thnn_function_backend with arguments")


_LEGACY_CALLS = {c.name: c for c in (
    _Call("collections.OrderedDict", _ordered_dict),
    _Call("builtins.set", _set),
    _Call("__builtin__.set", _set),  # how protocol 2 names builtins
    _Call("torch._utils._rebuild_tensor_v2", _rebuild_tensor),
    _Call("torch._utils._rebuild_parameter", _rebuild_parameter),
    _Call("torch.nn.parameter.Parameter", _parameter),  # torch 0.4 pickled parameters so
    # Modules saved by torch < 1.5 hold `_backend`, pickled as a call of this function, which
    # today's torch keeps for those files only (it returns None): it is torch's, not the
    # model's, so the walk of the model's modules cannot list it.
    _Call("torch.nn.backends.thnn._get_thnn_function_backend", _thnn_backend),
)}


def _legacy_pickle(architecture: str) -> SimpleNamespace:
    """The `pickle_module` torch.load reads a legacy file with, for one architecture."""
    allowed: dict[str, Any] = {**_LEGACY_CALLS, **_stand_ins(architecture)}

    class Unpickler(_PickleReader):
        names = allowed

    def load(file, **kwargs):
        return Unpickler(file, **kwargs).load()

    return SimpleNamespace(__name__=__name__ + ".legacy_pickle", Unpickler=Unpickler, load=load)


_PLAIN = frozenset({
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
    "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
    "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
})
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}


class _PickleReader:
    """What torch.load asks of `pickle_module.Unpickler`: (file, **kwargs), load(),
    find_class() (torch overrides it to name storages) and persistent_load (torch sets it)."""

    names: ClassVar[dict[str, Any]] = {}

    def __init__(self, file, **_kwargs: Any):
        self._file = file
        self.persistent_load: Callable[[Any], Any] | None = None
        self._storages: dict[str, int] = {}  # key -> bytes torch allocates for it

    def find_class(self, module: str, name: str) -> Any:
        found = self.names.get(f"{module}.{name}")
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found

    def load(self) -> Any:
        stack: list[Any] = []
        marks: list[list[Any]] = []
        memo: dict[int, Any] = {}
        for opcode, arg, _ in pickletools.genops(self._file):
            op = opcode.name
            if op in _PLAIN:
                stack.append(arg)
            elif op in _CONSTANTS:
                stack.append(_CONSTANTS[op])
            elif op in ("PROTO", "FRAME"):
                pass
            elif op == "STOP":
                break
            elif op == "MARK":
                marks.append(stack)
                stack = []
            elif op == "POP_MARK":
                stack = marks.pop()
            elif op == "POP":
                stack.pop()
            elif op == "DUP":
                stack.append(stack[-1])
            elif op in ("TUPLE", "LIST", "DICT", "FROZENSET", "APPENDS", "SETITEMS", "ADDITEMS"):
                items, stack = stack, marks.pop()
                self._marked(op, items, stack)
            elif op in ("EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"):
                n = ("EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3").index(op)
                items = tuple(stack[len(stack) - n:])
                del stack[len(stack) - n:]
                stack.append(items)
            elif op == "EMPTY_LIST":
                stack.append([])
            elif op == "EMPTY_DICT":
                stack.append({})
            elif op == "EMPTY_SET":
                stack.append(set())
            elif op == "APPEND":
                value = stack.pop()
                _expect(stack[-1], list).append(value)
            elif op == "SETITEM":
                value, key = stack.pop(), stack.pop()
                _expect(stack[-1], dict, OrderedDict)[key] = value
            elif op in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1]
            elif op == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif op in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo[arg])
            elif op == "GLOBAL":
                stack.append(self.find_class(*arg.split(" ", 1)))
            elif op == "STACK_GLOBAL":
                name, module = _expect(stack.pop(), str), _expect(stack.pop(), str)
                stack.append(self.find_class(module, name))
            elif op in ("PERSID", "BINPERSID"):
                stack.append(self._persistent(arg if op == "PERSID" else stack.pop()))
            elif op == "REDUCE":
                args, function = _expect(stack.pop(), tuple), stack.pop()
                if not isinstance(function, _Call):
                    raise _Refused(f"a call of {getattr(function, 'pickled_as', '') or 'an object'}")
                stack.append(function.handler(args))
            elif op == "NEWOBJ":
                args, cls = _expect(stack.pop(), tuple), stack.pop()
                if not (isinstance(cls, type) and issubclass(cls, PickledModule)) or args:
                    raise _Refused("a new object of a class outside the model")
                stack.append(object.__new__(cls))
            elif op == "BUILD":
                state, target = stack.pop(), stack[-1]
                if isinstance(target, PickledModule):
                    target.__setstate__(state)
                elif type(target) is OrderedDict and type(state) is dict and all(
                        type(k) is str and not k.startswith("__") for k in state):
                    target.__dict__.update(state)  # a state dict's `_metadata`
                else:
                    raise _Refused(f"attributes set on a {type(target).__name__}")
            else:
                raise _Refused(f"the pickle operation {op}")
        if len(stack) != 1 or marks:
            raise ValueError("the pickle does not hold exactly one object")
        return stack[0]

    @staticmethod
    def _marked(op: str, items: list[Any], stack: list[Any]) -> None:
        if op == "TUPLE":
            stack.append(tuple(items))
        elif op == "LIST":
            stack.append(items)
        elif op == "DICT":
            stack.append(dict(zip(items[::2], items[1::2], strict=True)))
        elif op == "FROZENSET":
            stack.append(frozenset(items))
        elif op == "APPENDS":
            _expect(stack[-1], list).extend(items)
        elif op == "SETITEMS":
            _expect(stack[-1], dict, OrderedDict).update(
                zip(items[::2], items[1::2], strict=True))
        else:
            _expect(stack[-1], set).update(items)

    def _persistent(self, pid: Any) -> Any:
        import torch

        kind = pid[0].decode("ascii") if type(pid) is tuple and pid and type(
            pid[0]) is bytes else (pid[0] if type(pid) is tuple and pid else None)
        if kind == "module" and len(pid) == 4:
            # torch < 1.6 named each module class (with its source code) this way
            if isinstance(pid[1], type) and issubclass(pid[1], PickledModule):
                return pid[1]
            raise _Refused("a module class outside the model")
        if kind != "storage" or len(pid) != 6 or self.persistent_load is None:
            raise _Refused("a persistent object other than a tensor storage")
        storage_type, key, location, numel, view = pid[1:]
        if not (isinstance(storage_type, torch.serialization.StorageType)
                and type(key) is str and type(location) in (str, bytes)
                and type(numel) is int and 0 <= numel
                and numel * storage_type.dtype.itemsize <= MAX_WEIGHTS_BYTES):
            raise _Refused("a tensor storage described with unexpected values")
        if view is not None and not (
                type(view) is tuple and len(view) == 3 and type(view[0]) is str
                and all(type(n) is int and n >= 0 for n in view[1:])
                and view[1] + view[2] <= numel):
            raise _Refused("a view of a tensor storage with unexpected values")
        # torch allocates each storage as announced before reading it: all of them together
        # cannot hold more than the file does.
        self._storages.setdefault(key, numel * storage_type.dtype.itemsize)
        if sum(self._storages.values()) > MAX_WEIGHTS_BYTES:
            raise _Refused("tensor storages larger than any weights file")
        return self.persistent_load(pid)


def _expect(value: Any, *types: type) -> Any:
    if type(value) not in types:
        raise ValueError(f"a {type(value).__name__} where the pickle needs "
                         f"{' or '.join(t.__name__ for t in types)}")
    return value
