"""hxc: compile one PyTorch model into IREE artifacts for every kind of hardware,
and pick the right one at run time.

    hxc compile model.pt2 --targets cpu,cuda,rocm,vulkan -o model.hxc
    model = hxc.runtime.load("model.hxc")
"""

__version__ = "0.1.0"
