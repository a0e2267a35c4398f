"""Load a bundle on whatever hardware this host has.

    import hxc.runtime
    model = hxc.runtime.load("model.hxc")        # best artifact for this host
    print(model.artifact.id, model.device.label)  # never a silent choice
    print(model.explain())
    y = model(x)                                  # numpy or torch in, same kind out
"""

from hxc.runtime.loader import LoadedModel, load
from hxc.runtime.probe import HostProbe, probe_host
from hxc.runtime.select import Selection, select

__all__ = ["HostProbe", "LoadedModel", "Selection", "load", "probe_host", "select"]
