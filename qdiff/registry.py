"""`ClassRegistry`: names -> classes, filled by a class decorator.

An extension point of qdiff is one registry: the activation quantizers by
`quant.act_mode` (`qdiff.quant.register_act_quantizer`), the weight quantizers by
`quant.weight_mode` (`qdiff.quant.register_weight_quantizer`) and the export's
activation codes by `act_granularity` (`qdiff.export.act_codes.register_act_codes`). A
new kind is one new file whose class carries the decorator; nothing else in qdiff names
it. The registry is a
read-only mapping in registration order, so callers ask `name in registry`,
`registry[name]` and `list(registry)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

C = TypeVar("C", bound=type)


class ClassRegistry(Mapping[str, type]):
    """Subclasses of `base` by name; `register(name)` decorates one and sets its `attribute`
    to the name. `what` names an entry in messages ("Activation mode"). `lookup` and
    `unregister` of a name that is not registered raise `unknown` naming `key` (the config
    key the names are the values of, e.g. "quant.act_mode") and the registered names.
    """

    def __init__(self, what: str, base: type, attribute: str, *, key: str = "name",
                 unknown: type[Exception] = KeyError) -> None:
        self.what, self.base, self.attribute = what, base, attribute
        self.key, self.unknown = key, unknown
        self._classes: dict[str, type] = {}

    def lookup(self, name: str) -> type:
        """The class registered under `name`; `unknown` (one line) if there is none."""
        try:
            return self._classes[name]
        except KeyError:
            raise self.unknown(f"{self.key}={name!r} is not registered; registered: "
                               f"{list(self)}.") from None

    def register(self, name: str) -> Callable[[C], C]:
        """Class decorator: `cls` is what `name` stands for from now on."""
        def register(cls: C) -> C:
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(f"{self.what} {name!r}: the decorator decorates an "
                                f"{self.base.__name__} subclass, not {cls!r}.")
            if name in self._classes:
                raise ValueError(f"{self.what} {name!r} is taken by "
                                 f"{self._classes[name].__name__}; registered: {list(self)}.")
            setattr(cls, self.attribute, name)
            self._classes[name] = cls
            return cls
        return register

    def unregister(self, name: str) -> None:
        """Forget `name` (what names it is refused from then on); `unknown` if it is not
        registered."""
        self.lookup(name)
        del self._classes[name]

    def __getitem__(self, name: str) -> type:
        return self._classes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)
