"""The Vulkan device features IREE's device info leaves out, read from the Vulkan API.

IREE 3.13's `dump_device_info` lists shaderFloat16, shaderInt8 and the 8/16-bit storage
features, but not the core 1.0 features shaderInt64, shaderInt16 and shaderFloat64,
which decide whether SPIR-V using 64-bit integers can run. This asks the Vulkan loader
(libvulkan.so.1) directly through ctypes: create an instance, list the physical
devices, and read each one's properties (to match it with IREE's device by vendor id,
device id and name) and core features. Everything is read-only; any failure returns
None, and the caller treats the features as unknown.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

_VK_STRUCTURE_TYPE_APPLICATION_INFO = 0
_VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO = 1
_VK_API_VERSION_1_1 = (1 << 22) | (1 << 12)

# VkPhysicalDeviceFeatures, in declaration order (55 VkBool32 fields).
_CORE_FEATURES = (
    "robustBufferAccess fullDrawIndexUint32 imageCubeArray independentBlend geometryShader tessellationShader "
    "sampleRateShading dualSrcBlend logicOp multiDrawIndirect drawIndirectFirstInstance depthClamp depthBiasClamp "
    "fillModeNonSolid depthBounds wideLines largePoints alphaToOne multiViewport samplerAnisotropy "
    "textureCompressionETC2 textureCompressionASTC_LDR textureCompressionBC occlusionQueryPrecise "
    "pipelineStatisticsQuery vertexPipelineStoresAndAtomics fragmentStoresAndAtomics "
    "shaderTessellationAndGeometryPointSize shaderImageGatherExtended shaderStorageImageExtendedFormats "
    "shaderStorageImageMultisample shaderStorageImageReadWithoutFormat shaderStorageImageWriteWithoutFormat "
    "shaderUniformBufferArrayDynamicIndexing shaderSampledImageArrayDynamicIndexing "
    "shaderStorageBufferArrayDynamicIndexing shaderStorageImageArrayDynamicIndexing shaderClipDistance "
    "shaderCullDistance shaderFloat64 shaderInt64 shaderInt16 shaderResourceResidency shaderResourceMinLod "
    "sparseBinding sparseResidencyBuffer sparseResidencyImage2D sparseResidencyImage3D sparseResidency2Samples "
    "sparseResidency4Samples sparseResidency8Samples sparseResidency16Samples sparseResidencyAliased "
    "variableMultisampleRate inheritedQueries"
).split()
# The ones that matter for compute SPIR-V and that IREE does not report.
WANTED = ("shaderFloat64", "shaderInt64", "shaderInt16")


class _AppInfo(ctypes.Structure):
    _fields_ = [("sType", ctypes.c_uint32), ("pNext", ctypes.c_void_p), ("pApplicationName", ctypes.c_char_p),
                ("applicationVersion", ctypes.c_uint32), ("pEngineName", ctypes.c_char_p),
                ("engineVersion", ctypes.c_uint32), ("apiVersion", ctypes.c_uint32)]  # fmt: skip


class _InstanceInfo(ctypes.Structure):
    _fields_ = [("sType", ctypes.c_uint32), ("pNext", ctypes.c_void_p), ("flags", ctypes.c_uint32),
                ("pApplicationInfo", ctypes.POINTER(_AppInfo)), ("enabledLayerCount", ctypes.c_uint32),
                ("ppEnabledLayerNames", ctypes.c_void_p), ("enabledExtensionCount", ctypes.c_uint32),
                ("ppEnabledExtensionNames", ctypes.c_void_p)]  # fmt: skip


class _PropertiesHead(ctypes.Structure):
    # The leading fields of VkPhysicalDeviceProperties; the rest (limits...) is read
    # into the padding and ignored.
    _fields_ = [("apiVersion", ctypes.c_uint32), ("driverVersion", ctypes.c_uint32), ("vendorID", ctypes.c_uint32),
                ("deviceID", ctypes.c_uint32), ("deviceType", ctypes.c_uint32), ("deviceName", ctypes.c_char * 256),
                ("_rest", ctypes.c_uint8 * 4096)]  # fmt: skip


@dataclass(frozen=True)
class PhysicalDevice:
    vendor_id: int
    device_id: int
    name: str
    features: tuple[str, ...]  # the WANTED core features this device has


@functools.cache
def physical_devices() -> tuple[PhysicalDevice, ...] | None:
    """Every Vulkan physical device with its WANTED core features; None if the Vulkan
    loader cannot be opened or queried."""
    try:
        vk = ctypes.CDLL("libvulkan.so.1")
    except OSError:
        return None
    try:
        return _query(vk)
    except (AttributeError, OSError, ValueError):
        return None


def _query(vk: ctypes.CDLL) -> tuple[PhysicalDevice, ...] | None:
    app = _AppInfo(_VK_STRUCTURE_TYPE_APPLICATION_INFO, None, b"hxc", 1, b"hxc", 1, _VK_API_VERSION_1_1)
    info = _InstanceInfo(_VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO, None, 0, ctypes.pointer(app), 0, None, 0, None)
    instance = ctypes.c_void_p()
    vk.vkCreateInstance.restype = ctypes.c_int32
    if vk.vkCreateInstance(ctypes.byref(info), None, ctypes.byref(instance)) != 0:
        return None
    try:
        count = ctypes.c_uint32(0)
        vk.vkEnumeratePhysicalDevices.restype = ctypes.c_int32
        if vk.vkEnumeratePhysicalDevices(instance, ctypes.byref(count), None) != 0:
            return None
        handles = (ctypes.c_void_p * count.value)()
        if vk.vkEnumeratePhysicalDevices(instance, ctypes.byref(count), handles) not in (0, 5):  # VK_INCOMPLETE
            return None
        out = []
        for handle in handles[: count.value]:
            props = _PropertiesHead()
            vk.vkGetPhysicalDeviceProperties(ctypes.c_void_p(handle), ctypes.byref(props))
            flags = (ctypes.c_uint32 * len(_CORE_FEATURES))()
            vk.vkGetPhysicalDeviceFeatures(ctypes.c_void_p(handle), ctypes.byref(flags))
            have = dict(zip(_CORE_FEATURES, flags))
            out.append(PhysicalDevice(props.vendorID, props.deviceID, props.deviceName.decode(errors="replace"),
                                      tuple(f for f in WANTED if have[f])))  # fmt: skip
        return tuple(out)
    finally:
        vk.vkDestroyInstance(instance, None)
